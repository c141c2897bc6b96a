import json

import open_clip
import pytest
import torch

from edgedistill.core.errors import UserError
from edgedistill.distill.recipe import TeacherConfig
from edgedistill.distill.teachers import check_teacher, load_teacher, resolve_device, resolve_source
from tests.conftest import TINY_CONFIG


def test_teacher_from_config_json_and_local_checkpoint(tiny_teacher):
    config, checkpoint = tiny_teacher
    teacher = load_teacher(TeacherConfig(model=str(config), pretrained=str(checkpoint)))
    assert not any(p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training
    assert teacher.embed_dim == 32
    images = torch.randn(3, 3, 32, 32)
    emb = teacher.embed_images(images)
    assert emb.shape == (3, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    texts = teacher.embed_texts(["a red circle", "a blue square"])
    assert texts.shape == (2, 32) and torch.allclose(texts.norm(dim=-1), torch.ones(2), atol=1e-5)
    # The loaded weights are the checkpoint's: same output as the model the fixture saved.
    reference = open_clip.create_model("tiny-clip")
    reference.load_state_dict(torch.load(checkpoint, weights_only=True))
    with torch.no_grad():
        expected = reference.eval().encode_image(images, normalize=True)
    assert torch.allclose(emb, expected, atol=1e-5)
    assert teacher.identity["weights"].startswith("file:") and len(teacher.identity["config_sha256"]) == 64
    assert teacher.preprocess_cfg["size"] == [32, 32]


def test_identity_follows_weights_and_config(tiny_teacher, tmp_path):
    config, checkpoint = tiny_teacher
    base = resolve_source(TeacherConfig(model=str(config), pretrained=str(checkpoint)))
    other_weights = tmp_path / "other.pt"
    state = torch.load(checkpoint, weights_only=True)
    state["logit_scale"] = state["logit_scale"] + 1
    torch.save(state, other_weights)
    assert resolve_source(TeacherConfig(model=str(config), pretrained=str(other_weights))).weights != base.weights
    wider = tmp_path / "wider.json"
    wider.write_text(json.dumps({**TINY_CONFIG, "embed_dim": 48}))
    assert resolve_source(TeacherConfig(model=str(wider))).config_sha256 != base.config_sha256


def test_config_file_named_like_a_builtin_does_not_shadow_it(tmp_path):
    fake = tmp_path / "ViT-B-32.json"
    fake.write_text(json.dumps(TINY_CONFIG))
    source = resolve_source(TeacherConfig(model=str(fake)))
    assert source.model_name != "ViT-B-32"
    assert open_clip.get_model_config("ViT-B-32")["embed_dim"] == 512


def test_hub_form_config_json_is_accepted(tmp_path):
    hub = tmp_path / "open_clip_config.json"
    hub.write_text(json.dumps({"model_cfg": TINY_CONFIG, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5],
                                                                            "std": [0.25, 0.25, 0.25]}}))
    teacher = load_teacher(TeacherConfig(model=str(hub)))
    assert teacher.preprocess_cfg["mean"] == [0.5, 0.5, 0.5] and teacher.preprocess_cfg["std"] == [0.25] * 3
    assert teacher.source.weights == "random(seed=0)"


def test_random_teacher_is_reproducible(tiny_teacher):
    cfg = TeacherConfig(model=str(tiny_teacher[0]))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(load_teacher(cfg).embed_images(x), load_teacher(cfg).embed_images(x))


def test_unknown_model_suggests_names():
    with pytest.raises(UserError, match=r"teacher.model 'ViT-B-23' is not an open_clip model; did you mean .*ViT-B-32"):
        resolve_source(TeacherConfig(model="ViT-B-23"))


def test_missing_config_json():
    with pytest.raises(UserError, match="teacher.model /nope/cfg.json not found"):
        resolve_source(TeacherConfig(model="/nope/cfg.json"))


def test_json_that_is_not_a_model_config(tmp_path):
    bad = tmp_path / "cfg.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(UserError, match="is not an open_clip model config"):
        resolve_source(TeacherConfig(model=str(bad)))


def test_unknown_tag_lists_known_tags():
    with pytest.raises(UserError, match=r"neither a pretrained tag nor an existing file \(known tags for ViT-B-32: "
                                        r"openai, .*laion2b_s34b_b79k"):
        resolve_source(TeacherConfig(model="ViT-B-32", pretrained="laion2b_typo"))


def test_checkpoint_of_another_architecture(tiny_teacher, tmp_path):
    wider = tmp_path / "wider.json"
    wider.write_text(json.dumps({**TINY_CONFIG, "embed_dim": 48}))
    with pytest.raises(UserError, match=r"does not load into .*wider.json.*check that teacher.model matches"):
        load_teacher(TeacherConfig(model=str(wider), pretrained=str(tiny_teacher[1])))


def test_checkpoint_with_arbitrary_objects_is_not_unpickled(tiny_teacher, tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": torch.load(tiny_teacher[1], weights_only=True), "extra": object.__new__(Exploit)},
               evil)
    with pytest.raises(UserError, match="holds objects other than tensors"):
        load_teacher(TeacherConfig(model=str(tiny_teacher[0]), pretrained=str(evil)))


class Exploit:
    pass


def test_failed_download_is_one_line(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, as without internet
    with pytest.raises(UserError) as e:
        load_teacher(TeacherConfig(model="RN50", pretrained="openai"))
    msg = str(e.value)
    assert msg.startswith("could not download open_clip weights for RN50 'openai'")
    assert "set teacher.pretrained to its local path" in msg and "\n" not in msg


def test_cuda_without_gpu_is_a_user_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_teacher_on_cuda_matches_cpu(tiny_teacher):
    cfg = TeacherConfig(model=str(tiny_teacher[0]), pretrained=str(tiny_teacher[1]))
    x = torch.randn(4, 3, 32, 32)
    cpu = load_teacher(cfg, "cpu").embed_images(x)
    gpu = load_teacher(cfg, "cuda").embed_images(x).cpu()
    assert torch.nn.functional.cosine_similarity(cpu, gpu).min() > 0.999


def fake_hub(monkeypatch, tiny_teacher, tmp_path):
    """Serve a hub repository from local files, as open_clip would see it after a download."""
    import open_clip.factory
    import open_clip.pretrained

    config = {"model_cfg": TINY_CONFIG, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    weights = tmp_path / "open_clip_model.safetensors"
    from safetensors.torch import save_file
    save_file(torch.load(tiny_teacher[1], weights_only=True), weights)
    monkeypatch.setattr(open_clip.factory, "_get_hf_config", lambda model_id, cache_dir=None: config)
    fetch = lambda model_id, *a, **k: str(weights)  # noqa: E731
    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", fetch)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", fetch)
    return weights


def test_hf_hub_teacher_is_keyed_by_the_loaded_bytes(monkeypatch, tiny_teacher, tmp_path):
    weights = fake_hub(monkeypatch, tiny_teacher, tmp_path)
    teacher = load_teacher(TeacherConfig(model="ignored-name", pretrained="hf-hub:org/tiny-clip"))
    assert teacher.source.model_name == "hf-hub:org/tiny-clip"
    assert teacher.identity["weights"].startswith("hf-hub:org/tiny-clip@sha256:")
    assert teacher.preprocess_cfg["mean"] == [0.5] * 3 and teacher.embed_dim == 32
    assert teacher.embed_texts(["hello"]).shape == (1, 32)
    first = teacher.identity["weights"]
    state = torch.load(tiny_teacher[1], weights_only=True)
    state["logit_scale"] += 1
    from safetensors.torch import save_file
    save_file(state, weights)  # the repository changed under the same name
    assert load_teacher(TeacherConfig(model="hf-hub:org/tiny-clip")).identity["weights"] != first


def test_hf_hub_download_failure_is_one_line(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"could not download open_clip weights for hf-hub:org/none .*local path"):
        load_teacher(TeacherConfig(model="ViT-B-32", pretrained="hf-hub:org/none"))


def test_text_padding_is_cut_without_changing_embeddings(tiny_teacher):
    teacher = load_teacher(TeacherConfig(model=str(tiny_teacher[0]), pretrained=str(tiny_teacher[1])))
    texts = ["a red circle", "a large blue square on the left of a small green star", "x"]
    assert teacher.trim_text is None
    cut = teacher.embed_texts(texts)
    assert teacher.trim_text is True  # the first call checked it against open_clip's own encode_text
    with torch.no_grad():
        full = teacher.model.encode_text(teacher.tokenizer(texts), normalize=True)
    assert torch.allclose(cut, full, atol=1e-5)
    teacher.trim_text = False
    assert torch.allclose(teacher.embed_texts(texts), full, atol=1e-6)


def test_text_padding_is_kept_where_pooling_is_not_at_end_of_text(tmp_path):
    config = tmp_path / "last-pool.json"
    config.write_text(json.dumps({**TINY_CONFIG, "text_cfg": {**TINY_CONFIG["text_cfg"], "pool_type": "last"}}))
    teacher = load_teacher(TeacherConfig(model=str(config)))
    assert teacher.trim_text is False  # the last position depends on the padding: never cut
    assert teacher.embed_texts(["a red circle"]).shape == (1, 32)


def test_config_json_teacher_survives_later_registrations(tiny_teacher, tmp_path):
    first = load_teacher(TeacherConfig(model=str(tiny_teacher[0])))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**TINY_CONFIG, "embed_dim": 16}))
    resolve_source(TeacherConfig(model=str(other)))  # open_clip rescans its config paths here
    assert open_clip.get_model_config(first.source.model_name)["embed_dim"] == 32
    assert open_clip.get_tokenizer(first.source.model_name)(["x"]).shape == (1, 16)


def test_a_config_with_bad_values_is_one_line_in_check_and_in_load(tmp_path):
    bad = tmp_path / "bad.json"
    vision = {k: v for k, v in TINY_CONFIG["vision_cfg"].items() if k != "head_width"}
    bad.write_text(json.dumps({**TINY_CONFIG, "vision_cfg": {**vision, "width": 63}}))  # 63 // 64 = 0 heads
    for call in (check_teacher, load_teacher):
        with pytest.raises(UserError, match=r"bad.json: open_clip cannot build this model \(embed_dim and num_heads"):
            call(TeacherConfig(model=str(bad)))


def test_check_finds_a_checkpoint_that_does_not_fit_without_loading_a_model(tiny_teacher, tmp_path):
    state = torch.load(tiny_teacher[1], weights_only=True)
    state["visual.proj"] = torch.zeros(3, 3)
    wrong = tmp_path / "wrong.pt"
    torch.save(state, wrong)
    with pytest.raises(UserError, match=r"does not load into .*size mismatch for visual.proj"):
        check_teacher(TeacherConfig(model=str(tiny_teacher[0]), pretrained=str(wrong)))
    assert check_teacher(TeacherConfig(model=str(tiny_teacher[0]), pretrained=str(tiny_teacher[1]))).weights.startswith(
        "file:")


@pytest.mark.slow
def test_a_raw_pickle_checkpoint_is_one_line_without_warnings(tiny_teacher, tmp_path):
    import pickle
    import subprocess
    import sys

    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(torch.load(tiny_teacher[1], weights_only=True), protocol=4))
    script = ("from edgedistill.distill.recipe import TeacherConfig; from edgedistill.distill.teachers import load_teacher; "
              f"load_teacher(TeacherConfig(model={str(tiny_teacher[0])!r}, pretrained={str(raw)!r}))")
    proc = subprocess.run([sys.executable, "-W", "default", "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert "UserError: teacher checkpoint" in proc.stderr and "Warning" not in proc.stderr


def test_without_a_network_the_hub_is_asked_for_its_cache_only(monkeypatch):
    """The hub client retries for about a minute when the network is down; an unreachable host is detected first
    and the download asks the local cache only (which answers at once)."""
    import huggingface_hub.constants
    import open_clip

    import edgedistill.distill.teachers as teachers

    seen = {}

    def create(*args, **kwargs):
        seen["offline"] = huggingface_hub.constants.HF_HUB_OFFLINE
        raise RuntimeError("LocalEntryNotFoundError: not in the cache")

    monkeypatch.setattr(teachers, "_reachable", lambda host, timeout=5.0: False)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", create)
    with pytest.raises(UserError, match=r"could not download .*huggingface.co cannot be reached from this machine"):
        load_teacher(TeacherConfig(model="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    assert seen["offline"] is True and huggingface_hub.constants.HF_HUB_OFFLINE is False


def test_loading_a_teacher_keeps_the_callers_logging_switch(tiny_teacher):
    import logging

    logging.disable(logging.WARNING)
    try:
        load_teacher(TeacherConfig(model=str(tiny_teacher[0]), pretrained=str(tiny_teacher[1])))
        assert logging.root.manager.disable == logging.WARNING  # once reset to NOTSET, wiping the caller's level
    finally:
        logging.disable(logging.NOTSET)
