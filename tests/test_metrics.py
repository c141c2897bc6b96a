"""Retrieval Recall@K (cross-checked against clip_benchmark), zero-shot accuracy, student-teacher agreement,
twin (one-edit pair) accuracy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgedistill.data.scenes import EDITS
from edgedistill.evaluation.metrics import agreement, retrieval_metrics, twin_accuracy, zero_shot_accuracy


def random_pairs(seed: int, n_images: int, dim: int = 8, noise: float = 1.0) -> tuple[torch.Tensor, ...]:
    """Images, 1-5 captions each (noisy copies of their image, in shuffled order), caption -> image index."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n_images, dim, generator=g, dtype=torch.float64)
    per_image = torch.randint(1, 6, (n_images,), generator=g)
    t2i = torch.repeat_interleave(torch.arange(n_images), per_image)
    t2i = t2i[torch.randperm(len(t2i), generator=g)]
    txt = img[t2i] + noise * torch.randn(len(t2i), dim, generator=g, dtype=torch.float64)
    return img, txt, t2i


def clip_benchmark_recalls(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor, ks: tuple[int, ...]) -> dict:
    """clip_benchmark's protocol, as in clip_benchmark.metrics.zeroshot_retrieval.evaluate, in percent."""
    from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k
    scores = F.normalize(txt, dim=-1) @ F.normalize(img, dim=-1).T  # (n_texts, n_images)
    positive_pairs = torch.zeros_like(scores, dtype=torch.bool)
    positive_pairs[torch.arange(len(scores)), t2i] = True
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100 * (recall_at_k(scores.T, positive_pairs.T, k) > 0).float().mean().item()
        out[f"t2i_r{k}"] = 100 * (recall_at_k(scores, positive_pairs, k) > 0).float().mean().item()
    return out


@pytest.mark.parametrize("seed,n_images,noise", [(0, 30, 0.8), (1, 50, 1.5), (2, 12, 3.0), (3, 40, 0.3)])
def test_matches_clip_benchmark(seed, n_images, noise):
    img, txt, t2i = random_pairs(seed, n_images, noise=noise)
    ks = (1, 5, 10)
    ours = retrieval_metrics(img, txt, t2i, ks=ks, chunk=7)
    ref = clip_benchmark_recalls(img, txt, t2i, ks)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-4), key
    assert ours["rsum"] == pytest.approx(sum(ref.values()), abs=1e-3)
    assert 0 < ours["t2i_r1"] < 100 or noise < 0.5  # a non-trivial case


def test_float32_input_and_scale_invariance():
    img, txt, t2i = random_pairs(5, 25)
    ref = retrieval_metrics(img, txt, t2i)
    assert retrieval_metrics(img.float() * 3.0, txt.float() * 0.1, t2i) == pytest.approx(ref)


def hand_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0.5, 0.0],    # image 0: its image is best            -> t2i rank 0
                        [0.0, 1.0, 0.2],    # image 0: images 1 and 2 score higher   -> t2i rank 2
                        [0.3, 0.2, 1.0],    # image 1: images 2 and 0 score higher   -> t2i rank 2
                        [0.0, 0.1, 1.0]])   # image 2: its image is best             -> t2i rank 0
    return img, txt, torch.tensor([0, 0, 1, 2])


def test_hand_checked_case():
    img, txt, t2i = hand_case()
    # i2t: image 0's best own caption (0) is first -> 0; image 1's own caption (2) has captions 1 and 0 above it
    # -> 2; image 2's own caption (3) is first -> 0.
    m = retrieval_metrics(img, txt, t2i, ks=(1, 2, 3))
    assert m["i2t_r1"] == pytest.approx(200 / 3) and m["i2t_r2"] == pytest.approx(200 / 3)
    assert m["i2t_r3"] == 100.0
    assert m["t2i_r1"] == 50.0 and m["t2i_r2"] == 50.0 and m["t2i_r3"] == 100.0
    assert m["rsum"] == pytest.approx(200 / 3 * 2 + 100 + 50 + 50 + 100)
    assert set(retrieval_metrics(img, txt, t2i)) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5",
                                                     "t2i_r10", "rsum"}


def test_images_without_captions_are_not_i2t_queries_but_stay_candidates():
    img, txt, t2i = hand_case()
    extra = torch.ones(1, 3)  # image 3, no caption; it outscores the own image of captions 1 and 2
    m = retrieval_metrics(torch.cat([img, extra]), txt, t2i, ks=(1, 2, 3, 4))
    assert m["i2t_r1"] == pytest.approx(200 / 3)  # still 3 queries, and image 3's caption-less row is not one
    assert m["i2t_r3"] == 100.0
    # t2i ranks are now 0, 3, 3, 0: image 3 is a candidate that outranks the own image of captions 1 and 2
    assert m["t2i_r1"] == 50.0 and m["t2i_r3"] == 50.0 and m["t2i_r4"] == 100.0


def test_ties_count_against_the_query():
    """A collapsed model (all embeddings equal) must not score: a tie with a wrong candidate ranks it above."""
    img, txt = torch.ones(4, 3), torch.ones(4, 3)
    m = retrieval_metrics(img, txt, torch.arange(4), ks=(1, 3, 4))
    assert m["i2t_r1"] == 0 and m["t2i_r1"] == 0 and m["i2t_r3"] == 0 and m["t2i_r3"] == 0
    assert m["i2t_r4"] == 100 and m["t2i_r4"] == 100  # 3 wrong candidates ahead: rank 3 < 4


def test_chunk_size_does_not_matter():
    img, txt, t2i = random_pairs(7, 40)
    img = torch.cat([img, torch.randn(5, img.shape[1], dtype=img.dtype)])  # some caption-less images too
    one = retrieval_metrics(img, txt, t2i, chunk=1)
    big = retrieval_metrics(img, txt, t2i, chunk=10**6)
    assert one == big


def test_retrieval_input_errors():
    img, txt, t2i = hand_case()
    with pytest.raises(ValueError, match="widths"):
        retrieval_metrics(img, txt[:, :2], t2i)
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(img, txt, torch.tensor([0, 0, 1, 3]))
    with pytest.raises(ValueError, match="one image index per caption"):
        retrieval_metrics(img, txt, t2i[:3])


def test_zero_shot_mean_per_class_differs_from_overall_on_unbalanced_classes():
    classes = torch.eye(3)
    # class 0: 8 images, all right; class 1: 2 images, both predicted as class 0; class 2: no images;
    # one unlabelled image, ignored.
    images = torch.cat([torch.tensor([[1.0, 0.1, 0.0]]).repeat(8, 1), torch.tensor([[1.0, 0.5, 0.0]]).repeat(2, 1),
                        torch.tensor([[0.0, 0.0, 1.0]])])
    labels = torch.tensor([0] * 8 + [1] * 2 + [-1])
    m = zero_shot_accuracy(images, classes, labels)
    assert m["zs_top1"] == pytest.approx(80.0)
    assert m["zs_mean_class"] == pytest.approx(50.0)  # (100 + 0) / 2: class 2 has no images, so no vote
    with pytest.raises(ValueError, match="labels must be"):
        zero_shot_accuracy(images, classes, torch.tensor([3] + [0] * 10))
    with pytest.raises(ValueError, match="at least one labelled"):
        zero_shot_accuracy(images, classes, torch.full((11,), -1))


def test_agreement():
    img, txt, t2i = random_pairs(3, 30, dim=16)
    img = torch.cat([img, torch.randn(4, 16, dtype=img.dtype)])  # caption-less images are not i2t queries
    same = agreement(img, txt, img, txt, t2i)
    assert same["agreement_top1"] == 100.0 and same["cosine_to_teacher"] == pytest.approx(1.0)
    scaled = agreement(img * 2, txt * 5, img, txt, t2i, chunk=3)  # normalised inside
    assert scaled["agreement_top1"] == 100.0 and scaled["cosine_to_teacher"] == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    noisy = agreement(img + 0.7 * torch.randn(img.shape, generator=g, dtype=img.dtype),
                      txt + 0.7 * torch.randn(txt.shape, generator=g, dtype=txt.dtype), img, txt, t2i)
    assert 0 < noisy["agreement_top1"] < 100 and 0 < noisy["cosine_to_teacher"] < 1
    # denominators: 30 i2t queries (the 4 extra images have no caption) + every caption as a t2i query
    queries = 30 + len(t2i)
    assert (noisy["agreement_top1"] * queries / 100) == pytest.approx(round(noisy["agreement_top1"] * queries / 100))
    with pytest.raises(ValueError, match="same shapes"):
        agreement(img[:, :8], txt[:, :8], img, txt, t2i)


# --------------------------------------------------------------------------------------------- twin accuracy
# Scenes twins (edgedistill.data.scenes): images 2k and 2k + 1 differ by one edit.


def _twin_embeddings(invert: set[str]) -> tuple[torch.Tensor, torch.Tensor, list[dict], torch.Tensor]:
    """Images 2k, 2k + 1 of each pair; orthogonal image embeddings, two noisy captions each, pointing at their
    own image except in pairs whose edit is in ``invert``, where each caption points at the twin."""
    twins = [{"a": 2 * k, "b": 2 * k + 1, "edit": EDITS[k % len(EDITS)]} for k in range(21)]
    n = 2 * len(twins)
    image = torch.eye(n, 64)
    gen = torch.Generator().manual_seed(0)
    text, owner = [], []
    for t in twins:
        for me, other in ((t["a"], t["b"]), (t["b"], t["a"])):
            target = other if t["edit"] in invert else me
            for _ in range(2):
                text.append(image[target] + 0.1 * torch.randn(64, generator=gen))
                owner.append(me)
    return image, torch.nn.functional.normalize(torch.stack(text), dim=-1), twins, torch.tensor(owner)


def test_twin_accuracy_right_wrong_and_per_edit():
    for direction in ("i2t", "t2i", "group"):
        right = twin_accuracy(*_twin_embeddings(set()), direction=direction)
        assert right == {**{e: 100.0 for e in EDITS}, "all": 100.0}
        wrong = twin_accuracy(*_twin_embeddings(set(EDITS)), direction=direction)
        assert wrong == {**{e: 0.0 for e in EDITS}, "all": 0.0}
        mixed = twin_accuracy(*_twin_embeddings({"bind", "count"}), direction=direction)
        assert mixed["bind"] == mixed["count"] == 0.0 and mixed["colour"] == mixed["swap-position"] == 100.0
        assert mixed["all"] == pytest.approx(100 * 15 / 21)


def test_twin_accuracy_needs_both_images_to_choose_right():
    image, text, twins, owner = _twin_embeddings(set())
    # Image b of pair 0 becomes identical to image a: it can no longer prefer its own captions (ties are wrong).
    image = image.clone()
    image[1] = image[0]
    result = twin_accuracy(image, text, twins, owner)
    assert result["colour"] == pytest.approx(100 * 2 / 3) and result["all"] == pytest.approx(100 * 20 / 21)


def test_twin_accuracy_reports_edits_in_the_order_of_their_first_pair():
    image, text, twins, owner = _twin_embeddings(set())
    assert list(twin_accuracy(image, text, twins, owner)) == [*EDITS, "all"]  # the scenes twins take edits in turn
    names = ["size", "colour", "size", "zoom", "blur", "colour", "size"]  # any names, any order
    renamed = [{**t, "edit": names[k % len(names)]} for k, t in enumerate(twins)]
    assert list(twin_accuracy(image, text, renamed, owner)) == ["size", "colour", "zoom", "blur", "all"]


@pytest.mark.parametrize("change, message", [
    (dict(direction="both"), "direction must be"), (dict(twins=[]), "twins is empty"),
    (dict(text_emb=torch.zeros(84, 63)), "embeddings must be"), (dict(text_to_image=torch.zeros(83)), "text_to_image"),
])
def test_twin_accuracy_refuses_bad_input(change, message):
    image, text, twins, owner = _twin_embeddings(set())
    args = {"image_emb": image, "text_emb": text, "twins": twins, "text_to_image": owner, **change}
    with pytest.raises(ValueError, match=message):
        twin_accuracy(**args)


def test_twin_accuracy_needs_a_caption_for_every_twin_image():
    image, text, twins, owner = _twin_embeddings(set())
    keep = owner != 3  # image 3 (pair 1's b) loses its captions
    with pytest.raises(ValueError, match="at least one caption"):
        twin_accuracy(image, text[keep], twins, owner[keep])
