"""edgedistill embed / search / classify: an index of a folder, manifest or shards, built in resumable chunks,
searched by text or image with the model that made it; zero-shot classification; bad input as one line."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgedistill
import edgedistill.runtime.index as index_module
from edgedistill.cli import main
from edgedistill.core.errors import UserError
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


@pytest.mark.slow
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
    name = _named(out, "embeddings")
    emb = np.load(out / name)
    emb[1, 0] = np.nan
    np.save(out / name, emb)  # the same size: only the values tell
    capsys.readouterr()
    assert main(["search", str(out), "a dog"]) == 2
    assert capsys.readouterr().err.strip() == f"error: index {out} is damaged ({name} holds NaN or " \
                                              f"infinite values); embed again"


def _named(out, what):
    return json.loads((out / "index.json").read_text())["files"][what]["name"]


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


@pytest.mark.slow
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


# ------------------------------------------------------------------------------------------------ re-embedding

def _embed(capsys, *args):
    capsys.readouterr()
    code = main(["embed", *map(str, args)])
    return code, capsys.readouterr().err


def _decoded(monkeypatch):
    """The images each decode call is given, by file name (what was embedded, not reused)."""
    seen = []
    real = index_module.decoded_batches

    def recording(images, *args, **kwargs):
        seen.extend(Path(str(i)).name for i in images)
        return real(images, *args, **kwargs)

    monkeypatch.setattr(index_module, "decoded_batches", recording)
    return seen


def _bmp(path, seed, mtime):
    """A 24x16 BMP: every one has the same size in bytes, whatever its pixels."""
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(path)
    os.utime(path, ns=(mtime, mtime))


@pytest.mark.slow
def test_a_second_embed_embeds_only_new_and_changed_images_and_drops_deleted_ones(tiny_export, data, tmp_path,
                                                                                    capsys, monkeypatch):
    folder, out = tmp_path / "photos", tmp_path / "photos.index"
    shutil.copytree(data / "val_images", folder)
    _bmp(folder / "a.bmp", 1, 10**18)
    _bmp(folder / "b.bmp", 2, 10**18)
    assert (folder / "a.bmp").stat().st_size == (folder / "b.bmp").stat().st_size
    model = ["--model", tiny_export, "--out", out]
    code, err = _embed(capsys, folder, *model)
    assert code == 0 and "12 embedded, 0 reused, 0 dropped: 12 images" in err
    decoded = _decoded(monkeypatch)

    write_images(folder, 1, seed=7, start=900)  # one new photo
    code, err = _embed(capsys, folder, *model)
    assert code == 0 and "1 embedded, 12 reused, 0 dropped: 13 images" in err
    assert decoded == ["img_00900.jpg"]

    os.utime(folder / "a.bmp", ns=(2 * 10**18, 2 * 10**18))  # touched, the same bytes: the hash says reuse
    code, err = _embed(capsys, folder, *model)
    assert code == 0 and "0 embedded, 13 reused" in err and decoded == ["img_00900.jpg"]

    shutil.copyfile(folder / "b.bmp", folder / "a.bmp")  # the same size, other content, a later mtime
    os.utime(folder / "a.bmp", ns=(3 * 10**18, 3 * 10**18))
    code, err = _embed(capsys, folder, *model)
    assert code == 0 and "1 embedded, 12 reused" in err and decoded[1:] == ["a.bmp"]
    idx = open_index(out)
    rows = {Path(it["path"]).name: r for r, it in enumerate(idx.items)}
    assert np.allclose(idx.embeddings[rows["a.bmp"]], idx.embeddings[rows["b.bmp"]], atol=1e-6)
    assert idx.items[rows["a.bmp"]]["sha256"] == hashlib.sha256((folder / "b.bmp").read_bytes()).hexdigest()

    (folder / "img_00003.jpg").unlink()
    code, err = _embed(capsys, folder, *model)
    assert code == 0 and "0 embedded, 12 reused, 1 dropped: 12 images" in err
    idx = open_index(out)
    assert "img_00003.jpg" not in {Path(it["path"]).name for it in idx.items}
    code, _ = _embed(capsys, folder, "--model", tiny_export, "--out", tmp_path / "fresh.index")
    fresh = open_index(tmp_path / "fresh.index")  # the updated index is what a fresh build gives, row for row
    assert [it["path"] for it in idx.items] == [it["path"] for it in fresh.items]
    assert np.allclose(np.asarray(idx.embeddings), np.asarray(fresh.embeddings), atol=1e-6)
    assert sorted(p.name for p in out.iterdir()) == sorted(["index.json", _named(out, "embeddings"),
                                                             _named(out, "items")])  # old versions removed


def test_an_interrupted_commit_leaves_the_old_index_whole(tiny_export, data, tmp_path, capsys, monkeypatch):
    folder, out = tmp_path / "photos", tmp_path / "photos.index"
    shutil.copytree(data / "val_images", folder)
    enc = edgedistill.load(tiny_export, device="cpu")
    build_index(folder, enc, out)
    before = (out / "index.json").read_text()
    write_images(folder, 2, seed=7, start=900)

    def killed(*args):
        raise KeyboardInterrupt  # after the new data files are written, before index.json names them

    monkeypatch.setattr(index_module, "_publish", killed)
    with pytest.raises(KeyboardInterrupt):
        build_index(folder, enc, out)
    assert len(list(out.glob("embeddings-*.npy"))) == 2  # the new files are there, unnamed
    assert (out / "index.json").read_text() == before
    idx = open_index(out)
    assert idx.doc.count == 10 and len(idx.items) == 10 and "img_00900.jpg" not in str(idx.items)
    capsys.readouterr()
    assert main(["search", str(out), "red circle", "-k", "2"]) == 0
    monkeypatch.undo()
    doc = build_index(folder, enc, out)
    assert doc.count == 12 and doc.update == {"embedded": 2, "reused": 10, "dropped": 0}
    assert len(list(out.glob("embeddings-*.npy"))) == 1 and len(list(out.glob("items-*.jsonl"))) == 1


def test_a_nan_embedding_stops_embed_and_commits_nothing(tiny_export, data, tmp_path, capsys, monkeypatch):
    from edgedistill.runtime.encoder import Encoder

    folder, out = tmp_path / "photos", tmp_path / "photos.index"
    shutil.copytree(data / "val_images", folder)
    assert _embed(capsys, folder, "--model", tiny_export, "--out", out)[0] == 0
    before = (out / "index.json").read_text()
    write_images(folder, 2, seed=7, start=900)
    real = Encoder.encode_pixels

    def nan_for_the_second(self, pixels, batch_size=32):
        emb = real(self, pixels, batch_size)
        emb[1:2] = np.nan
        return emb

    monkeypatch.setattr(Encoder, "encode_pixels", nan_for_the_second)
    code, err = _embed(capsys, folder, "--model", tiny_export, "--out", out)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: the model gave NaN or infinite values for ")
    assert "img_00901.jpg" in err.strip().splitlines()[-1]
    assert (out / "index.json").read_text() == before and open_index(out).doc.count == 10


def test_an_index_built_with_relative_paths_is_searched_from_elsewhere(tiny_export, data, tmp_path, capsys,
                                                                        monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    model, source = os.path.relpath(tiny_export), os.path.relpath(data / "val_images")
    assert _embed(capsys, source, "--model", model, "--out", "v.index")[0] == 0
    doc = json.loads(Path("v.index/index.json").read_text())
    assert doc["model"]["source"] == str(tiny_export.resolve())
    assert doc["source"]["path"] == str((data / "val_images").resolve())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert main(["search", "../work/v.index", "red circle", "-k", "1"]) == 0
    idx = open_index("../work/v.index")
    assert all(Path(it["path"]).is_absolute() and Path(it["path"]).is_file() for it in idx.items)

    inside = tmp_path / "library"  # images inside the index folder are recorded relative: the folder can move
    shutil.copytree(data / "val_images", inside / "photos")
    assert _embed(capsys, inside / "photos", "--model", tiny_export, "--out", inside)[0] == 0
    recorded = [json.loads(line)["path"] for line in (inside / _named(inside, "items")).read_text().splitlines()]
    assert recorded[0] == "photos/img_00000.jpg"
    moved = tmp_path / "moved"
    inside.rename(moved)
    assert all(Path(it["path"]).is_file() for it in open_index(moved).items)


@pytest.mark.slow
def test_another_model_or_decode_setting_is_refused_unless_rebuild(tiny_export, data, tmp_path, capsys):
    out = tmp_path / "v.index"
    args = [data / "val_images", "--model", tiny_export, "--out", out]
    assert _embed(capsys, *args)[0] == 0
    assert json.loads((out / "index.json").read_text())["decode"] == {"mode": "reduced", "exif": True}
    doc = json.loads((out / "index.json").read_text())
    doc["model"]["identity"], doc["model"]["source"] = "0" * 64, "/models/another/export"
    (out / "index.json").write_text(json.dumps(doc))
    code, err = _embed(capsys, *args)
    line = err.strip().splitlines()[-1]
    assert code == 2 and "was made by /models/another/export" in line and "--rebuild" in line
    assert "another --out" in line and json.loads((out / "index.json").read_text())["model"]["identity"] == "0" * 64
    code, err = _embed(capsys, *args, "--rebuild")
    assert code == 0 and "10 embedded, 0 reused" in err

    for flags in (["--decode", "exact"], ["--no-exif"]):  # other decode settings: other pixels, other rows
        code, err = _embed(capsys, *args, *flags)
        assert code == 2 and "decode reduced, exif on" in err and "--rebuild" in err
    code, err = _embed(capsys, *args, "--decode", "exact", "--rebuild")
    assert code == 0 and "10 embedded, 0 reused" in err
    assert json.loads((out / "index.json").read_text())["decode"] == {"mode": "exact", "exif": True}
    code, err = _embed(capsys, *args, "--decode", "exact")
    assert code == 0 and "0 embedded, 10 reused" in err
    code, err = _embed(capsys, *args, "--decode", "fast")
    assert code == 2 and "--decode 'fast' is not a decode mode" in err


def test_a_damaged_chunk_is_embedded_again(tiny_export, data, tmp_path, capsys, monkeypatch):
    enc = edgedistill.load(tiny_export, device="cpu")
    monkeypatch.setattr(index_module, "CHUNK", 4)
    real = index_module._write_chunk
    written = []

    def dies_after_two(chunks, k, *args):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(k)
        return real(chunks, k, *args)

    monkeypatch.setattr(index_module, "_write_chunk", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_index(data / "val_images", enc, tmp_path / "i")
    chunks = tmp_path / "i" / ".chunks"
    (chunks / "chunk-000001.npy").write_bytes((chunks / "chunk-000001.npy").read_bytes()[:-40])  # truncated
    written.clear()
    monkeypatch.setattr(index_module, "_write_chunk", lambda chunks, k, *a: (written.append(k), real(chunks, k, *a)))
    capsys.readouterr()
    doc = build_index(data / "val_images", enc, tmp_path / "i", console=index_module.make_console(stderr=True))
    assert "discarded damaged chunk chunk-000001.json" in capsys.readouterr().err
    assert written == [1, 2] and doc.count == 10  # chunk 1's four images (its number free again), the other two
    fresh = build_index(data / "val_images", enc, tmp_path / "j")
    assert fresh.count == 10
    assert np.allclose(np.asarray(open_index(tmp_path / "i").embeddings), np.asarray(open_index(tmp_path / "j")
                                                                                     .embeddings), atol=1e-6)


def test_a_half_written_or_edited_index_is_refused(tiny_export, data, tmp_path, capsys):
    out = tmp_path / "v.index"
    assert _embed(capsys, data / "val_images", "--model", tiny_export, "--out", out)[0] == 0
    items = out / _named(out, "items")
    good = items.read_text()
    lines = good.splitlines()
    items.write_text("\n".join([json.dumps({"path": None}), *lines[1:]]) + "\n")
    doc = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps({**doc, "files": {**doc["files"], "items": {
        **doc["files"]["items"], "size": items.stat().st_size}}}))  # the size agrees: the line itself is refused
    with pytest.raises(UserError, match="line 1 is not a JSON object with a string path"):
        open_index(out)
    items.write_text(good + "\n")
    (out / "index.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match=f"{items.name} has {len(good) + 1} bytes, index.json says {len(good)}"):
        open_index(out)
    items.unlink()
    with pytest.raises(UserError, match=f"{items.name}, which index.json names, is missing"):
        open_index(out)


def test_a_version_1_index_is_still_searched_and_embedded_again(tiny_export, data, tmp_path, capsys):
    out = tmp_path / "v.index"
    assert _embed(capsys, data / "val_images", "--model", tiny_export, "--out", out)[0] == 0
    doc = json.loads((out / "index.json").read_text())
    (out / _named(out, "embeddings")).rename(out / "embeddings.npy")
    (out / _named(out, "items")).rename(out / "items.jsonl")
    for key in ("files", "decode", "update"):
        del doc[key]
    (out / "index.json").write_text(json.dumps({**doc, "version": 1}))
    assert open_index(out).doc.count == 10
    assert main(["search", str(out), "red circle", "-k", "1"]) == 0
    code, err = _embed(capsys, data / "val_images", "--model", tiny_export, "--out", out)
    assert code == 0 and "version 1" in err and "10 embedded, 0 reused" in err
    assert not (out / "embeddings.npy").exists() and json.loads((out / "index.json").read_text())["version"] == 2


WRITER = """
import os, shutil, sys
from pathlib import Path
import edgedistill
from edgedistill.runtime.index import build_index
from rich.console import Console
model, folder, out, spare = sys.argv[1:]
enc = edgedistill.load(model, device="cpu")
quiet = Console(file=open(os.devnull, "w"))
extra = Path(folder) / "extra.jpg"
while True:  # every build commits a new version: one image added, then dropped
    if extra.exists():
        extra.unlink()
    else:
        shutil.copyfile(spare, extra)
    build_index(folder, enc, Path(out), console=quiet)
    print("committed", flush=True)
"""


@pytest.mark.slow
def test_readers_during_rebuilds_and_kill_9_see_a_whole_index(tiny_export, data, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    folder, out = tmp_path / "photos", tmp_path / "photos.index"
    shutil.copytree(data / "val_images", folder)
    spare = write_images(tmp_path / "spare", 1, seed=9)[0]
    enc = edgedistill.load(tiny_export, device="cpu")
    build_index(folder, enc, out)
    for _ in range(2):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tiny_export), str(folder), str(out),
                                   str(spare)], stdout=subprocess.PIPE, text=True)
        try:
            assert writer.stdout.readline().strip() == "committed"  # it is rebuilding in a loop now
            counts = set()
            for _ in range(150):  # every read while it rebuilds is one whole version: 10 or 11 rows
                idx = open_index(out)
                counts.add(idx.doc.count)
                assert idx.embeddings.shape == (idx.doc.count, 32) and len(idx.items) == idx.doc.count
                time.sleep(0.01)
            assert counts <= {10, 11}
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait()
        idx = open_index(out)  # killed anywhere: the old version or the new one
        assert idx.doc.count in (10, 11) and len(idx.items) == idx.doc.count
        assert {Path(it["path"]).name for it in idx.items} - {p.name for p in folder.iterdir()} <= {"extra.jpg"}
    doc = build_index(folder, enc, out)  # and the next embed finishes the job, leaving one version
    assert doc.count == len(list(folder.iterdir()))
    assert len(list(out.glob("embeddings-*.npy"))) == 1 and not list(out.glob(".*.tmp"))


def test_an_update_loads_the_precision_the_index_was_embedded_at(tiny_export, data, tmp_path, capsys, monkeypatch):
    """load() measures its choice; were it to choose another precision today, the update would be refused. Embedding
    into an index asks for the precision it records, unless --precision or --rebuild says otherwise."""
    import edgedistill.runtime.loader as loader_module
    out = tmp_path / "p.index"
    args = [data / "val_images", "--model", tiny_export, "--out", out]
    assert _embed(capsys, *args)[0] == 0
    recorded = json.loads((out / "index.json").read_text())["model"]["image"]["precision"]
    assert index_module.recorded_precision(out) == recorded
    asked = []
    real = loader_module.load

    def spy(*a, **kw):
        asked.append(kw.get("precision"))
        return real(*a, **kw)

    monkeypatch.setattr(loader_module, "load", spy)
    code, err = _embed(capsys, *args)
    assert code == 0 and "0 embedded, 10 reused" in err and asked == [recorded]
    asked.clear()
    assert _embed(capsys, *args, "--rebuild")[0] == 0 and asked == [None]
    assert index_module.recorded_precision(tmp_path / "nothing-here") is None
