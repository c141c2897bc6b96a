"""edgedistill embed / search / classify: an index of a folder, manifest or shards, built in resumable chunks,
searched by text or image with the model that made it; zero-shot classification; bad input as one line."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgedistill
import edgedistill.runtime.index as index_module
from edgedistill.cli import main
from edgedistill.runtime.index import build_index, open_index
from tests.conftest import write_images


@pytest.fixture(scope="module")
def data(tiny_export):
    return tiny_export.parent.parent / "data"


def test_a_folder_becomes_an_index_whose_rows_are_the_images(tiny_export, data, tmp_path, capsys):
    folder = tmp_path / "photos"
    shutil.copytree(data / "val_images", folder / "a")
    (folder / "b").mkdir()
    (folder / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "photos.index"
    assert main(["embed", str(folder), "--model", str(tiny_export), "--out", str(out), "--batch", "4",
                 "--max-bad-fraction", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 of 11 images" in err and "broken.jpg" in err
    idx = open_index(out)
    assert idx.doc.count == 10 and idx.embeddings.shape == (10, 32) and len(idx.items) == 10
    assert [Path(i["path"]).name for i in idx.items] == sorted(p.name for p in (folder / "a").iterdir())
    used = idx.doc.model.image  # embed measured at its own batch: the index records which artifact it chose
    enc = edgedistill.load(tiny_export, device="cpu", backend=used["backend"], precision=used["precision"])
    want = enc.encode_image([i["path"] for i in idx.items])
    assert np.allclose(np.asarray(idx.embeddings), want, atol=1e-5)  # the rows are the model's embeddings
    assert idx.doc.bad_images[0][0].endswith("broken.jpg") and not (out / ".chunks").exists()


def test_search_by_text_and_image_ranks_by_cosine_and_draws_the_hits(tiny_export, data, tmp_path, capsys):
    out = tmp_path / "val.index"
    assert main(["embed", str(data / "val.jsonl"), "--model", str(tiny_export), "--out", str(out)]) == 0
    idx = open_index(out)
    assert idx.items[0]["captions"] and "label" in idx.items[0]  # a manifest's captions and labels are kept
    capsys.readouterr()
    html, png = tmp_path / "hits.html", tmp_path / "hits.png"
    assert main(["search", str(out), "red circle left", "-k", "3", "--html", str(html), "--png", str(png)]) == 0
    table = capsys.readouterr().out
    enc = edgedistill.load(tiny_export, device="cpu")
    scores = np.asarray(idx.embeddings) @ enc.encode_text(["red circle left"])[0]
    best = [Path(idx.items[i]["path"]).name for i in np.argsort(-scores)[:3]]
    assert [line for line in table.splitlines() if best[0] in line]  # the best hit is printed
    assert all(name in html.read_text() for name in best)
    sheet = Image.open(png)
    assert sheet.width > 3 * 150 and sheet.height > 150
    query = Path(idx.items[4]["path"])
    assert main(["search", str(out), "--image", str(query), "-k", "1"]) == 0
    assert query.name in capsys.readouterr().out  # an image finds itself first


def test_an_interrupted_embed_continues_where_it_stopped(tiny_export, data, tmp_path, monkeypatch):
    enc = edgedistill.load(tiny_export, device="cpu")
    monkeypatch.setattr(index_module, "CHUNK", 4)
    calls = {"n": 0}
    real = index_module._write_chunk

    def dies_after_two(*args, **kwargs):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(index_module, "_write_chunk", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_index(data / "val_images", enc, tmp_path / "i")
    assert len(list((tmp_path / "i" / ".chunks").glob("chunk-*.json"))) == 2
    assert not (tmp_path / "i" / "index.json").exists()
    embedded = []
    monkeypatch.setattr(index_module, "_write_chunk", lambda chunks, k, *a: (embedded.append(k), real(chunks, k, *a)))
    build_index(data / "val_images", enc, tmp_path / "i")
    assert embedded == [2]  # only the chunk that was not done
    whole = build_index(data / "val_images", enc, tmp_path / "j")
    assert np.array_equal(np.asarray(open_index(tmp_path / "i").embeddings), np.asarray(open_index(tmp_path / "j")
                                                                                        .embeddings))
    assert whole.count == 10


def test_an_index_is_searched_only_with_its_own_model(tiny_export, data, tmp_path, capsys):
    out = tmp_path / "v.index"
    assert main(["embed", str(data / "val_images"), "--model", str(tiny_export), "--out", str(out)]) == 0
    doc = json.loads((out / "index.json").read_text())
    doc["model"]["identity"] = "0" * 64
    (out / "index.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["search", str(out), "a dog"]) == 2
    assert "was made by another model" in capsys.readouterr().err


def test_classify_gives_each_image_its_top_classes(tiny_export, data, tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("red\nblue\n\ngreen\n")
    imgs = sorted((data / "val_images").glob("*.jpg"))[:2]
    assert main(["classify", *map(str, imgs), "--model", str(tiny_export), "--labels", str(labels), "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert all(p.name in out for p in imgs) and out.count("%") == 4


@pytest.mark.parametrize("args, message", [
    (["embed", "{missing}", "--model", "{export}"], "not found"),
    (["embed", "{empty}", "--model", "{export}"], "holds no images"),
    (["embed", "{images}", "--model", "{nothing}"], "none of: an export folder"),
    (["embed", "{images}", "--model", "{export}", "--out", "{file}"], "is a file, not a folder"),
    (["embed", "{images}", "--model", "{export}", "--device", "cuda"], "no CUDA GPU"),
    (["search", "{nothing}", "a dog"], "is not an index"),
    (["search", "{nothing}"], "give a text query or --image"),
    (["classify", "{missing}", "--model", "{export}", "--labels", "a,b"], "not found"),
    (["classify", "{images}", "--model", "{export}", "--labels", " , "], "holds no class names"),
    (["embed", "{images}", "--model", "{export}", "--batch", "0"], "--batch 0"),
    (["embed", "{images}", "--model", "{export}", "--max-bad-fraction", "nan"], "--max-bad-fraction nan"),
    (["embed", "{images}", "--model", "{export}", "--max-bad-fraction", "1.5"], "from 0 to 1"),
    (["search", "{nothing}", "a dog", "-k", "0"], "--top"),
    (["classify", "{images}", "--model", "{export}", "--labels", "{nothing}/clases.txt"], "not found"),
    (["classify", "{images}", "--model", "{export}", "--labels", "cat"], "names one class"),
    (["classify", "{images}", "--model", "{export}", "--labels", "{binary}"], "UTF-8"),
    (["search", "{nothing}", "a dog", "--png", "/proc/hits.png"], "--png /proc"),
    (["search", "{nothing}", "a dog", "--html", "{empty}"], "is a folder"),
    (["classify", "{images}", "--model", "{export}", "--labels", "a,b", "-k", "0"], "--top"),
])
def test_bad_input_is_one_line(tiny_export, data, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00cat")
    values = {"binary": tmp_path / "binary.txt", "missing": tmp_path / "missing.jsonl", "empty": tmp_path / "empty", "export": tiny_export,
              "images": data / "val_images", "nothing": tmp_path, "file": tmp_path / "file"}
    assert main([a.format(**values) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("error: ") and not any("Traceback" in e for e in err)


def test_a_damaged_index_is_refused_not_searched(tiny_export, data, tmp_path, capsys):
    out = tmp_path / "v.index"
    assert main(["embed", str(data / "val_images"), "--model", str(tiny_export), "--out", str(out)]) == 0
    emb = np.load(out / "embeddings.npy")
    emb[1, 0] = np.nan
    np.save(out / "embeddings.npy", emb)
    capsys.readouterr()
    assert main(["search", str(out), "a dog"]) == 2
    assert capsys.readouterr().err.strip() == f"error: index {out} is damaged (embeddings.npy holds NaN or " \
                                              f"infinite values); embed again"


def test_shards_embed_like_a_manifest(tiny_export, tmp_path):
    import tarfile

    write_images(tmp_path / "imgs", 5)
    shard = tmp_path / "shards" / "00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for i, p in enumerate(sorted((tmp_path / "imgs").glob("*.jpg"))):
            tar.add(p, arcname=f"{i:05d}.jpg")
    enc = edgedistill.load(tiny_export, device="cpu")
    doc = build_index(str(shard), enc, tmp_path / "s.index")
    assert doc.count == 5


def test_embed_runs_onnxruntime_without_spinning_unless_asked(tiny_export, data, tmp_path, monkeypatch):
    """Spinning pool threads compete with the decode threads (benchmarks/README.md, embed_speed.py)."""
    import edgedistill.runtime.loader as api

    asked = []
    real_load = api.load

    def recording_load(*args, **kwargs):
        asked.append(kwargs.get("spin"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(api, "load", recording_load)
    for flags, want in (([], False), (["--spin"], True)):
        out = tmp_path / f"spin{len(flags)}.index"
        assert main(["embed", str(data / "val.jsonl"), "--model", str(tiny_export), "--out", str(out), *flags]) == 0
        assert asked[-1] is want
    from edgedistill.runtime.ort import SPIN_KEYS

    enc = real_load(tiny_export, device="cpu", backend="onnxruntime-cpu", spin=False)
    options = enc._image.session.get_session_options()
    assert [options.get_session_config_entry(k) for k in SPIN_KEYS] == ["0", "0"]
    assert enc._text.session.get_session_options().get_session_config_entry(SPIN_KEYS[0]) == "0"
