"""Outputs a program reads: search / classify --json and --csv (docs/outputs.md) carry what the table shows;
zero_shot's result names its labels; prompts are checked; classify decodes like embed; every command's --help
runs as ``python -m edgedistill.cli``."""

import csv
import io
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer

import edgedistill
from edgedistill.cli import app, main
from edgedistill.core.errors import UserError
from edgedistill.core.terminal import make_console
from edgedistill.data.images import BadImages
from edgedistill.runtime.encoder import Encoder, EncoderInfo, TextTable, ZeroShot, check_prompt
from edgedistill.runtime.index import open_index
from tests.conftest import write_images

ROOT = Path(__file__).resolve().parent.parent
ESC = "\x1b]52;c;aGk=\x07"  # an OSC 52 clipboard write, as a file name or a label could carry it


def no_raw_controls(text: str) -> bool:
    """Nothing a terminal would act on: no control character but newlines, no C1, no bidi override; no lone
    surrogate (an undecodable byte of a file name)."""
    return not any((ord(c) < 32 and c != "\n") or 0x7f <= ord(c) <= 0x9f or 0x202a <= ord(c) <= 0x202e
                   or 0xd800 <= ord(c) <= 0xdfff for c in text)


@pytest.fixture(scope="module")
def data(tiny_export):
    return tiny_export.parent.parent / "data"


@pytest.fixture(scope="module")
def val_index(tiny_export, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "val.index"
    assert main(["embed", str(data / "val.jsonl"), "--model", str(tiny_export), "--out", str(out)]) == 0
    return out


def run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    got = capsys.readouterr()
    return code, got.out, got.err


# ------------------------------------------------------------------------------------------------------ search

@pytest.mark.slow
def test_search_json_and_csv_carry_the_table(tiny_export, val_index, capsys):
    code, table, _ = run(capsys, "search", str(val_index), "red circle left", "-k", "4")
    assert code == 0
    code, out, _ = run(capsys, "search", str(val_index), "red circle left", "-k", "4", "--json")
    assert code == 0
    doc = json.loads(out)  # exactly one document: anything else on stdout fails here
    idx = open_index(val_index)
    assert doc["query"] == {"text": "red circle left"} and doc["index"] == str(val_index)
    assert doc["count"] == 4 == len(doc["hits"]) and doc["indexed"] == len(idx.items) == 10
    assert doc["model"]["identity"] == idx.doc.model.identity and doc["model"]["image"]["artifact"]
    assert [h["rank"] for h in doc["hits"]] == [1, 2, 3, 4]
    scores = [h["score"] for h in doc["hits"]]
    assert scores == sorted(scores, reverse=True)
    by_path = {i["path"]: i for i in idx.items}
    for h in doc["hits"]:  # each hit is an indexed image with its caption, and is on the table's rows
        assert h["caption"] == by_path[h["path"]]["captions"][0]
        assert any(Path(h["path"]).name in line and f"{h['score']:.4f}" in line for line in table.splitlines())
    enc = edgedistill.load(tiny_export, device="cpu")
    want = np.asarray(idx.embeddings) @ enc.encode_text(["red circle left"])[0]
    assert np.allclose(scores, np.sort(want)[::-1][:4], atol=1e-4)

    code, out, _ = run(capsys, "search", str(val_index), "red circle left", "-k", "4", "--csv")
    assert code == 0
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["rank", "score", "path", "caption"] and len(rows) == 5
    assert [(int(r[0]), r[2], r[3]) for r in rows[1:]] == [(h["rank"], h["path"], h["caption"]) for h in doc["hits"]]
    assert np.allclose([float(r[1]) for r in rows[1:]], scores, atol=1e-6)


def test_search_by_image_says_so_in_the_json(val_index, capsys):
    query = open_index(val_index).items[3]["path"]
    code, out, _ = run(capsys, "search", str(val_index), "--image", query, "-k", "2", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["query"] == {"image": query} and doc["hits"][0]["path"] == query


def test_json_and_csv_together_are_one_line_exit_2(val_index, capsys):
    for args in (["search", str(val_index), "a dog"], ["classify", "x.jpg", "--model", "m", "--labels", "a,b"]):
        code, out, err = run(capsys, *args, "--json", "--csv")
        assert code == 2 and out == "" and err.strip() == "error: --json and --csv: give one of them"


# ---------------------------------------------------------------------------------------------------- classify

@pytest.mark.slow
def test_classify_json_and_csv_carry_the_table_and_the_api(tiny_export, data, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    imgs = [shutil.copy(p, folder) for p in sorted((data / "val_images").glob("*.jpg"))[:3]]
    (folder / "zz_broken.jpg").write_bytes(b"not a jpeg")
    common = ["classify", str(folder), "--model", str(tiny_export), "--labels", "red,blue,green", "-k", "2",
              "--decode", "exact"]
    code, table, err = run(capsys, *common)
    assert code == 0 and "skipped image" in err and "zz_broken.jpg" in err and "Traceback" not in err
    code, out, err = run(capsys, *common, "--json")
    assert code == 0 and "zz_broken.jpg" in err
    doc = json.loads(out)
    assert doc["labels"] == ["red", "blue", "green"] and doc["prompt"] == "a photo of a {label}." and doc["k"] == 2
    assert [Path(i["path"]).name for i in doc["images"]] == [Path(p).name for p in imgs]  # the broken one skipped
    assert [Path(s["path"]).name for s in doc["skipped"]] == ["zz_broken.jpg"] and doc["skipped"][0]["reason"]
    probs = edgedistill.load(tiny_export, device="cpu").zero_shot([str(p) for p in imgs], doc["labels"])
    for image, p, best in zip(doc["images"], probs, probs.top(2)):
        assert [t["label"] for t in image["top"]] == [name for name, _ in best]
        assert np.allclose([t["probability"] for t in image["top"]], np.sort(p)[::-1][:2], atol=1e-4)
        line = next(line for line in table.splitlines() if Path(image["path"]).name in line)
        assert all(f"{t['label']} {t['probability']:.1%}" in line for t in image["top"])

    code, out, _ = run(capsys, *common, "--csv")
    rows = list(csv.reader(io.StringIO(out)))
    assert code == 0 and rows[0] == ["path", "rank", "label", "probability"] and len(rows) == 1 + 3 * 2
    assert [(r[0], int(r[1]), r[2]) for r in rows[1:]] == [(i["path"], rank, t["label"]) for i in doc["images"]
                                                           for rank, t in enumerate(i["top"], 1)]
    assert np.allclose([float(r[3]) for r in rows[1:]],
                       [t["probability"] for i in doc["images"] for t in i["top"]], atol=1e-6)


@pytest.mark.slow
def test_file_derived_text_reaches_the_terminal_escaped(tiny_export, data, tmp_path, capsys):
    folder = tmp_path / "odd"
    folder.mkdir()
    evil = folder / f"evil{ESC}\u202ename\udcff.jpg"  # and a byte that is not UTF-8
    shutil.copy(sorted((data / "val_images").glob("*.jpg"))[0], evil)
    labels = tmp_path / "labels.txt"
    labels.write_text(f"caf\u00e9\nred{ESC}\n", encoding="utf-8")
    common = ["classify", str(evil), "--model", str(tiny_export), "--labels", str(labels), "-k", "2",
              "--prompt", f"a {{label}}{ESC}"]
    code, table, _ = run(capsys, *common)
    assert code == 0 and no_raw_controls(table) and all(e in table for e in ("\\x1b", "\\u202e", "\\xff"))
    code, out, _ = run(capsys, *common, "--json")
    assert code == 0 and out.isascii() and no_raw_controls(out)
    doc = json.loads(out)  # the JSON itself carries the exact text
    assert doc["images"][0]["path"] == str(evil) and doc["labels"] == ["caf\u00e9", f"red{ESC}"]
    assert doc["prompt"] == f"a {{label}}{ESC}"
    code, out, _ = run(capsys, *common, "--csv")
    assert code == 0 and no_raw_controls(out) and list(csv.reader(io.StringIO(out)))[1][0].startswith(
        str(folder / "evil\\x1b"))


def test_classify_with_no_readable_image_is_one_line(tiny_export, tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(b"nope")
    code, out, err = run(capsys, "classify", str(tmp_path / "a.jpg"), "--model", str(tiny_export), "--labels",
                         "a,b", "--json")
    assert code == 2 and out == ""
    assert err.strip().splitlines()[-1].startswith("error: none of the 1 images could be read")


def test_classify_decodes_like_embed(tiny_export, tmp_path, monkeypatch, capsys):
    import edgedistill.runtime.decode as decode_module

    seen = []
    real = decode_module.decoded_batches

    def recording(images, preprocess, batch, **kwargs):
        seen.append(kwargs)
        return real(images, preprocess, batch, **kwargs)

    monkeypatch.setattr(decode_module, "decoded_batches", recording)
    photo = write_images(tmp_path, 1, size=(256, 192))[0]
    for flags, want in (([], {"decode": "reduced", "exif": True}),
                        (["--decode", "exact", "--no-exif"], {"decode": "exact", "exif": False})):
        code, out, _ = run(capsys, "classify", str(photo), "--model", str(tiny_export), "--labels", "a,b", "--json",
                           *flags)
        assert code == 0 and len(json.loads(out)["images"]) == 1
        assert {k: seen[-1][k] for k in want} == want
    code, _, err = run(capsys, "classify", str(photo), "--model", str(tiny_export), "--labels", "a,b", "--decode",
                       "fast")
    assert code == 2 and "--decode fast" in err and "reduced" in err


@pytest.mark.parametrize("prompt, message", [
    ("a photo of {x} {label}", "has the field {x}"),
    ("a photo of a {", "is not a template"),
    ("a } photo of a {label}", "is not a template"),
    ("{label:d}", "does not format"),
    ("{label!z}", "does not format"),
    ("{label:{w}}", "has the field {w}"),
    ("{label.upper}", "has the field {label.upper}"),
    ("no placeholder", "needs a {label} placeholder"),
    ("{{label}}", "needs a {label} placeholder"),
])
def test_a_bad_prompt_is_one_line_before_the_model_loads(tmp_path, capsys, prompt, message):
    with pytest.raises(UserError, match=message) as e:
        check_prompt(prompt)
    assert repr(prompt) in str(e.value) and "\n" not in str(e.value)
    image = write_images(tmp_path, 1)[0]
    code, _, err = run(capsys, "classify", str(image), "--model", str(tmp_path / "no-model"), "--labels", "a,b",
                       "--prompt", prompt)
    assert code == 2 and message in err and err.count("\n") == 1


@pytest.mark.parametrize("prompt", ["a photo of a {label}.", "{label}", "{label!r} {{braces}}", "{label:>8}"])
def test_good_prompts_pass(prompt):
    check_prompt(prompt)


# ------------------------------------------------------------------------------------------- zero_shot's result

class FixedRunner:
    """An image "tower" that returns the given rows: pixels (N, 3, 1, 1) whose first channel is the row index."""
    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows

    def embed(self, x: np.ndarray, batch: int = 32) -> np.ndarray:
        return self.rows[x[:, 0, 0, 0].astype(int)]


def fake_encoder(image_rows: np.ndarray, prompts: list[str], text_rows: np.ndarray) -> Encoder:
    info = EncoderInfo("fake", "cpu", {"artifact": "x"}, None, "request")
    return Encoder(FixedRunner(image_rows), TextTable(text_rows, prompts), None, None, image_rows.shape[1], info)


def test_zero_shot_pixels_is_softmax_of_100_cosines_and_names_its_labels():
    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=(3, 8)).astype(np.float32)
    labels = ["cat", "dog", "car"]
    enc = fake_encoder(image, [f"a {x}" for x in labels], text)
    pixels = np.zeros((5, 3, 1, 1), np.float32)
    pixels[:, 0, 0, 0] = np.arange(5)
    probs = enc.zero_shot_pixels(pixels, labels, prompt="a {label}")
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    logits = 100 * unit(image) @ unit(text).T
    want = np.exp(logits - logits.max(axis=1, keepdims=True))
    want /= want.sum(axis=1, keepdims=True)
    assert isinstance(probs, np.ndarray) and probs.shape == (5, 3) and probs.dtype == np.float32
    assert np.allclose(probs, want, atol=1e-5)
    assert probs.labels == labels and probs.top_labels == [labels[i] for i in want.argmax(axis=1)]
    assert enc.zero_shot_pixels(pixels[:0], labels, prompt="a {label}").shape == (0, 3)


def test_a_zero_shot_result_is_an_array_that_names_its_columns():
    z = ZeroShot(np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]]), ["cat", "dog", "car"])
    assert z.top_labels == ["dog", "cat"]
    assert z.top(2) == [[("dog", pytest.approx(0.5)), ("car", pytest.approx(0.3))],
                        [("cat", pytest.approx(0.6)), ("car", pytest.approx(0.3))]]
    assert z[1:].top_labels == ["cat"]  # rows keep the labels
    assert np.allclose(z.sum(axis=1), 1) and type(z.sum(axis=1)) is np.ndarray  # a reduction is a plain array
    assert isinstance(z.sum(), np.floating) and z.argmax(axis=1).tolist() == [1, 0]
    assert (z * 2).labels == z.labels and (z * 2).top_labels == z.top_labels  # arithmetic keeps them
    again = pickle.loads(pickle.dumps(z))
    assert again.labels == z.labels and np.array_equal(again, z)
    with pytest.raises(ValueError, match="not zero-shot probabilities"):
        _ = z[:, :2].top_labels  # columns taken away: the labels no longer fit
    with pytest.raises(ValueError, match="not zero-shot probabilities"):
        _ = z.T.top(1)
    with pytest.raises(ValueError, match="one column per label"):
        ZeroShot(np.zeros((2, 3)), ["a", "b"])


# ---------------------------------------------------------------------------------------------- the bad-image knob

def test_the_bad_image_error_names_the_knob_the_user_turns():
    for knob, want in ((None, "raise data.max_bad_fraction"), ("--max-bad-fraction", "raise --max-bad-fraction")):
        bad = BadImages(total=10, max_fraction=0.1, what="embed", console=make_console(file=io.StringIO()),
                        **({"knob": knob} if knob else {}))
        bad.items = [(0, f"a{ESC}.jpg", "not an image file")]
        bad.check()  # 1 of 10: not past the limit
        bad.items.append((1, "b.jpg", "not an image file"))
        with pytest.raises(UserError, match=want) as e:
            bad.check()
        assert no_raw_controls(str(e.value)) and "a\\x1b" in str(e.value)


# ----------------------------------------------------------------------------------------------- every --help

def command_paths(group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, command in group.commands.items():
        path = (*prefix, name)
        out += command_paths(command, path) if hasattr(command, "commands") else [path]
    return out


@pytest.mark.slow
def test_every_command_has_help_through_python_m():
    commands = command_paths(typer.main.get_command(app))
    assert ("bench",) in commands and ("data", "scenes") in commands and len(commands) >= 10
    for path in commands:
        proc = subprocess.run([sys.executable, "-m", "edgedistill.cli", *path, "--help"], capture_output=True,
                              text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 0, (path, proc.stderr[-2000:])
        assert "Usage:" in proc.stdout and f"{' '.join(path)} [OPTIONS]" in proc.stdout, path
