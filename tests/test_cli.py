import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from edgedistill.cli import main
from tests.conftest import write_images, write_manifest, write_recipe


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgedistill", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def test_help_lists_commands_with_examples(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "cache" in out and "check" in out and "distill" in out and "eval" in out and "--debug" in out
    for command in ("cache", "check", "distill", "eval"):
        assert main([command, "--help"]) == 0
        assert "Examples" in capsys.readouterr().out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("edgedistill ")


def test_usage_error_exits_2(capsys):
    assert main(["cache"]) == 2
    assert "Missing argument" in capsys.readouterr().err


@pytest.mark.parametrize("args, expected", [
    (["export", "--fp61"], "error: No such option: --fp61 (Possible options: --fp16) (see edgedistill export --help)"),
    (["bench", "--batchsize", "4"], "No such option: --batchsize"),
    (["nonsense"], "No such command 'nonsense'"),
    (["data", "scenes", "--out", "x", "--n", "many"], "Invalid value for '--n'"),
])
def test_usage_errors_are_one_line(capsys, args, expected):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1 and "Usage" not in err


def test_no_arguments_prints_the_help(capsys):
    assert main([]) == 0 and "Usage" in capsys.readouterr().out
    assert main(["data"]) == 0 and "scenes" in capsys.readouterr().out


def test_an_eof_error_is_not_hidden_as_aborted(tmp_path, monkeypatch):
    """click turns any EOFError into 'Aborted!' and exit 1, which once hid a damaged cache file; an unexpected
    EOFError must show itself (a bug to report), not pose as an interruption."""
    import edgedistill.distill.recipe

    def eof(*a, **k):
        raise EOFError("No data left in file")

    monkeypatch.setattr(edgedistill.distill.recipe, "load_recipe", eof)
    with pytest.raises(EOFError, match="No data left"):
        main(["check", str(tmp_path / "r.yaml")])


def test_storage_faults_anywhere_are_one_line(tmp_path, monkeypatch, capsys):
    import edgedistill.distill.recipe

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(edgedistill.distill.recipe, "load_recipe", full)
    assert main(["check", str(tmp_path / "r.yaml")]) == 2
    assert capsys.readouterr().err == f"error: cannot write {tmp_path / 'x'} (No space left on device); free " \
                                      f"space, or choose a folder you can write to\n"


@pytest.mark.slow
def test_bad_recipe_is_one_line_exit_2_no_traceback(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nteacher: {model: RN50}\ndata: {train: t.jsonl, batch_sise: 3}\n")
    proc = run_cli("check", str(recipe))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: recipe {recipe}: unknown key 'data.batch_sise'; did you mean 'data.batch_size'?"]
    assert "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["check", str(tmp_path / "missing.yaml"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith("not found; check the path")


def test_missing_manifest_exit_2(tiny_teacher, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, tmp_path / "none.jsonl")
    assert main(["cache", str(recipe)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'none.jsonl'} not found: neither a folder of " \
                                              f"images nor a manifest file; check the path (in a recipe: " \
                                              f"data.train / data.val)"


def test_bad_manifest_line_exit_2(tiny_teacher, tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "a.jpg"}\n{"image": 3}\n')
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, manifest)
    assert main(["cache", str(recipe)]) == 2
    assert f"manifest {manifest} line 2: missing \"image\"" in capsys.readouterr().err


def test_check_prints_the_resolved_recipe_with_overrides(tiny_teacher, dataset, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, dataset["train"], dataset["val"])
    assert main(["check", str(recipe), "train.epochs=3", "data.batch_size=32"]) == 0
    captured = capsys.readouterr()
    resolved = yaml.safe_load(captured.out)
    assert resolved["train"]["epochs"] == 3 and resolved["data"]["batch_size"] == 32
    assert resolved["loss"]["balancer"]["name"] == "coverage"  # defaults filled in
    assert resolved["loss"]["balancer"]["momentum"] == 0.9 and resolved["loss"]["balancer"]["equalise"] is True
    assert "train: 40 images, 80 captions" in captured.err


def test_cache_command_builds_then_reuses(tiny_teacher, dataset, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, dataset["train"], dataset["val"])
    assert main(["cache", str(recipe)]) == 0
    first = capsys.readouterr().out
    assert first.count("built") == 2
    assert main(["cache", str(recipe)]) == 0
    assert capsys.readouterr().out.count("reused") == 2
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2  # train and val


def test_too_many_bad_images_exit_2(tiny_teacher, tmp_path, capsys):
    images = write_images(tmp_path / "imgs", 20)
    images[0].unlink()
    images[1].write_text("nope")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, write_manifest(tmp_path / "m.jsonl", images))
    assert main(["cache", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "error: train: 2 of 20 images could not be read, more than 5%" in err
    assert "raise data.max_bad_fraction" in err


def _wait_for_reader(fifo: Path, proc: subprocess.Popen, timeout: float = 240) -> int:
    """Open the FIFO for writing once the build blocks reading it; return the write end."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the build ended before reaching the FIFO: {proc.stderr.read()}")
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: nobody reads it yet
                raise
        time.sleep(0.02)
    raise AssertionError("the build never reached the FIFO")


def _interrupt_mid_build(tiny_teacher, tmp_path: Path, sig: int) -> tuple[Path, list[Path], bytes, str]:
    """Start `edgedistill cache` and send ``sig`` while it is inside chunk 3 (chunks 1-2 on disk)."""
    images = write_images(tmp_path / "imgs", 40)
    manifest = write_manifest(tmp_path / "train.jsonl", images)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_teacher, manifest, data={"batch_size": 4},
                          cache={"chunk_size": 8})
    # Image 20 is a FIFO: reading it blocks until we open its write end, so the signal lands mid-chunk 3.
    real_bytes = images[20].read_bytes()
    images[20].unlink()
    os.mkfifo(images[20])
    proc = subprocess.Popen([sys.executable, "-m", "edgedistill", "cache", str(recipe)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fd = _wait_for_reader(images[20], proc)
    proc.send_signal(sig)
    try:
        _, stderr = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        # The kernel may hand a process-directed SIGINT to one of torch's worker threads: Python then only sees
        # it when the main thread runs again, and that thread sits in read() on the FIFO. Closing the write end
        # ends the read (EOF), and the pending KeyboardInterrupt fires before the empty image is used.
        os.close(fd)
        fd = None
        _, stderr = proc.communicate(timeout=60)
    if fd is not None:
        os.close(fd)
    images[20].unlink()
    images[20].write_bytes(real_bytes)
    assert proc.returncode in (-sig, 130), stderr
    return recipe, images, real_bytes, stderr


@pytest.mark.slow
def test_ctrl_c_leaves_a_resumable_build_and_says_so(tiny_teacher, tmp_path):
    recipe, *_, stderr = _interrupt_mid_build(tiny_teacher, tmp_path, signal.SIGINT)
    assert "interrupted; run the same command again to continue where it stopped" in stderr
    assert "Traceback" not in stderr
    partial = next((tmp_path / "cache").glob("*.partial"))
    assert json.loads((partial / "progress.json").read_text())["images_done"] == 16


@pytest.mark.slow
def test_cache_build_killed_with_sigkill_resumes_to_the_same_result(tiny_teacher, tmp_path):
    recipe, *_ = _interrupt_mid_build(tiny_teacher, tmp_path, signal.SIGKILL)

    cache_root = tmp_path / "cache"
    assert not [p for p in cache_root.iterdir() if p.is_dir() and not p.name.endswith(".partial")]
    partial = next(cache_root.glob("*.partial"))
    assert json.loads((partial / "progress.json").read_text())["images_done"] == 16

    resumed = run_cli("cache", str(recipe))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the cache build at image 16 of 40" in resumed.stderr
    reference = run_cli("cache", str(recipe), f"cache.dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr

    [done] = [p for p in cache_root.iterdir() if p.is_dir()]
    [ref] = [p for p in (tmp_path / "reference").iterdir() if p.is_dir()]
    assert done.name == ref.name
    for name in ("image_emb", "image_ok", "text_emb", "text_offsets"):
        assert np.array_equal(np.load(done / f"{name}.npy"), np.load(ref / f"{name}.npy")), name


@pytest.mark.parametrize("argv, named", [
    (["search", "{name}", "a cat"], True),                               # a UserError naming the path
    (["classify", "{name}", "--labels", "cat,dog", "--model", "{name}"], True),
    (["embed", "{name}", "--model", "{name}"], True),
    (["search", "{name}", "a cat", "--top", "{name}"], False),             # a usage error about the value
])
def test_errors_print_names_from_the_user_with_control_characters_escaped(tmp_path, capsys, argv, named):
    """A path or value holding terminal control sequences (OSC 52 writes the clipboard, CSI clears the screen, a
    bidirectional override reorders the line) is shown escaped in the one-line error, never sent to the terminal."""
    name = str(tmp_path / "x\x1b]52;c;aGk=\x07\x1b[2J\u202egpj.jpg")
    capsys.readouterr()
    assert main([a.replace("{name}", name) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and err.isascii() and "\x1b" not in err
    assert ("\\x1b]52;c;aGk=\\x07\\x1b[2J\\u202egpj.jpg" in err) == named
