"""Shared fixtures: a tiny real open_clip teacher saved to files, synthetic JPEG datasets, recipes."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

# Under pytest-xdist (`pytest -n N`) N workers share the cores: one thread each, for the tests' own torch and for
# the processes they start (set before torch is imported), unless OMP_NUM_THREADS says otherwise. With two threads
# per worker on 2 cores the spinning pools of one worker stall the other (2026-12-07, 2 cores: the slow tests alone
# took 857 s at -n 2 that way, 970 s serially; fast and slow together 666 s at -n 2 with one thread).
ONE_THREAD_PER_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER")) and "OMP_NUM_THREADS" not in os.environ
if ONE_THREAD_PER_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"

# The Ctrl-C tests send SIGINT to the commands they start. A shell starts a background job (`pytest &`, CI in a
# job of its own) with SIGINT ignored, and an ignored signal stays ignored across exec: every command the tests
# start would be deaf to Ctrl-C. With Python's handler here, they start with the default disposition again.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import numpy as np
import open_clip
import pytest
import torch
import yaml
from PIL import Image

# A real open_clip CLIP (ViT + text transformer), small enough to build and run in well under a second.
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}

if ONE_THREAD_PER_WORKER:
    torch.set_num_threads(1)

WORDS = ["red", "blue", "green", "circle", "square", "star", "small", "large", "left", "right"]


# The longest test files, longest first: the sum of their tests' durations in CI's --durations (2026-12-07, 2 cores,
# -n auto). Run first, under `-n auto --dist loadfile` (the workers take whole files in collection order) they start
# at once on both workers and the short files fill the end; in name order a long file taken late kept one worker
# busy minutes after the other had finished.
LONG_FILES = ("test_export.py", "test_demo.py", "test_distributed.py", "test_gpu_check.py", "test_train.py",
              "test_hostile_bundle.py", "test_cli.py", "test_evaluate.py", "test_layerwise.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """LONG_FILES first, in that order, then the rest in collection order; each file's own order kept."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))

@pytest.fixture(scope="session", autouse=True)
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cache root for the whole session (load()'s device measurements, calibration ranges...), never the
    user's own ~/.cache: a test that wants a cache of its own sets EDGEDISTILL_CACHE itself."""
    root = tmp_path_factory.mktemp("cache")
    before = os.environ.get("EDGEDISTILL_CACHE")
    os.environ["EDGEDISTILL_CACHE"] = str(root)
    yield root
    if before is None:
        os.environ.pop("EDGEDISTILL_CACHE", None)
    else:
        os.environ["EDGEDISTILL_CACHE"] = before


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config JSON, checkpoint) of a randomly initialised tiny open_clip model, written by the test."""
    folder = tmp_path_factory.mktemp("teacher")
    config = folder / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(1234)
    model = open_clip.create_model("tiny-clip")
    checkpoint = folder / "tiny-clip.pt"
    torch.save(model.state_dict(), checkpoint)
    return config, checkpoint


def write_images(folder: Path, n: int, size: tuple[int, int] = (48, 40), seed: int = 0,
                 start: int = 0) -> list[Path]:
    """n JPEG files with random blocky content (distinct images give distinct embeddings)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(start, start + n):
        small = rng.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.NEAREST)
        path = folder / f"img_{i:05d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def captions_for(i: int, k: int = 2) -> list[str]:
    rng = np.random.default_rng(i)
    return [" ".join(rng.choice(WORDS, size=4)) + f" number {i} v{j}" for j in range(k)]


def write_manifest(path: Path, images: list[Path], captions_per_image: int = 2, relative: bool = True) -> Path:
    """A JSON Lines manifest for ``images`` (paths relative to the manifest's folder by default)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, img in enumerate(images):
            name = str(img.relative_to(path.parent)) if relative else str(img)
            f.write(json.dumps({"image": name, "captions": captions_for(i, captions_per_image),
                                "label": WORDS[i % 3]}) + "\n")
    return path


@pytest.fixture
def dataset(tmp_path: Path) -> dict[str, Path]:
    """A small train/val dataset: 40 + 12 JPEGs with two captions each."""
    train = write_manifest(tmp_path / "data" / "train.jsonl", write_images(tmp_path / "data" / "images", 40))
    val = write_manifest(tmp_path / "data" / "val.jsonl",
                         write_images(tmp_path / "data" / "val_images", 12, seed=1))
    return {"train": train, "val": val, "root": tmp_path}


def write_recipe(path: Path, teacher: tuple[Path, Path], train_manifest: Path, val_manifest: Path | None = None,
                 cache_dir: Path | None = None, **sections: dict[str, Any]) -> Path:
    """A recipe for the tiny teacher; ``sections`` are merged over the defaults (e.g. data={"workers": 0})."""
    recipe: dict[str, Any] = {
        "name": "tiny",
        "seed": 0,
        "out": str(path.parent / "runs" / "tiny"),
        "device": "cpu",
        "teacher": {"model": str(teacher[0]), "pretrained": str(teacher[1])},
        "student": {"vision": "mobilenetv3_small_100", "text": "teacher"},
        "data": {"train": str(train_manifest), "val": str(val_manifest) if val_manifest else None,
                 "batch_size": 8, "workers": 0},
        "cache": {"dir": str(cache_dir or path.parent / "cache"), "chunk_size": 16},
    }
    for key, value in sections.items():
        recipe.setdefault(key, {}).update(value)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------- a private sshd
SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sshd:
    def __init__(self, host: str, port: int, options: list[str]) -> None:
        self.host, self.port, self.options = host, port, options

    def bench(self, bundle: Path, out: Path, remote_cmd: str, args: list[str] | None = None,
              **kw: object) -> Path:
        from edgedistill.bench.remote import run_remote_bench

        return run_remote_bench(self.host, bundle, args or [], out, remote_cmd=remote_cmd, port=self.port,
                                ssh_options=self.options, connect_timeout_s=5, **kw)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """A private sshd on 127.0.0.1 that lets this user in with a key made here, and nobody else."""
    if not os.path.exists(SSHD):
        pytest.skip("sshd not installed: apt-get install openssh-server")
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("ssh client not installed: apt-get install openssh-client")
    if not os.path.isdir("/run/sshd"):  # sshd's privilege separation folder
        try:
            os.makedirs("/run/sshd", mode=0o755)
        except OSError as e:
            pytest.skip(f"cannot create /run/sshd for sshd ({e})")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text(f"""\
ListenAddress 127.0.0.1
Port {port}
HostKey {d / 'host_key'}
AuthorizedKeysFile {d / 'authorized_keys'}
PidFile {d / 'sshd.pid'}
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
""")
    log = open(d / "sshd.log", "wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                pytest.fail(f"sshd exited with {proc.returncode}: {(d / 'sshd.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"sshd did not listen on port {port}: {(d / 'sshd.log').read_text()[-2000:]}")
                time.sleep(0.05)
        options = ["-F", "/dev/null", "-i", str(d / "client_key"), "-o", "IdentitiesOnly=yes",
                   "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
        yield Sshd(f"{pwd.getpwuid(os.getuid()).pw_name}@127.0.0.1", port, options)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# ---------------------------------------------------------------------------------------------- unwritable storage
@pytest.fixture
def unwritable_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder nothing can be written into: read-only permissions, or (as root, whom permissions do not stop) a
    read-only tmpfs mounted for the test. Skips where neither is possible."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot make a read-only folder here (root, and mount is not permitted)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)  # lazy: open memmaps keep it busy


@contextlib.contextmanager
def read_only_copy(src: Path, dest: Path) -> Iterator[Path]:
    """``src`` copied to ``dest`` and bind-mounted read-only over itself (root) or made read-only (others)."""
    shutil.copytree(src, dest)
    if os.geteuid() != 0:
        for p in [dest, *dest.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        yield dest
        for p in [dest, *dest.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        return
    if subprocess.run(["mount", "--bind", "-o", "ro", str(dest), str(dest)], capture_output=True).returncode:
        pytest.skip("cannot make a read-only folder here (root, and mount is not permitted)")
    try:
        yield dest
    finally:
        subprocess.run(["umount", "-l", str(dest)], capture_output=True)  # lazy: open memmaps keep it busy


# ---------------------------------------------------------------------------------------------- a trained export
@pytest.fixture(scope="session")
def tiny_export(tiny_teacher: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny student distilled for one epoch and exported (ONNX fp32 + INT8, the tokenizer): RUN/export. Shared by
    the loader, bench, embed/search and device tests (the data is in RUN/../data: val_images/ and val.jsonl); they
    read it and write beside it, never into it. Under pytest-xdist the first worker that needs it builds it in the
    session's shared temporary folder and the others wait for it and read it (built once, not once per worker)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build_tiny_export(tmp_path_factory.mktemp("export"), tiny_teacher)
    shared = tmp_path_factory.getbasetemp().parent / "tiny-export"  # the session's folder above the workers'
    shared.mkdir(exist_ok=True)
    with open(shared.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the build fails
        done = shared / "built"
        if not done.is_file():
            build_tiny_export(shared, tiny_teacher)
            done.write_text("ok\n")
    return shared / "run" / "export"


def build_tiny_export(root: Path, teacher: tuple[Path, Path]) -> Path:
    """``teacher`` (config, weights) distilled for one epoch on 32 JPEGs into root/run and exported (ONNX fp32 +
    INT8): root/run/export. The tiny_export fixture and CI's device check (.ci/make_export.py) use it."""
    from edgedistill.cli import main

    train = write_manifest(root / "data" / "train.jsonl", write_images(root / "data" / "images", 32))
    val = write_manifest(root / "data" / "val.jsonl", write_images(root / "data" / "val_images", 10, seed=1))
    recipe = write_recipe(root / "tiny.yaml", teacher, train, val, cache_dir=root / "cache",
                          student={"image_size": 32}, train={"epochs": 1, "warmup_steps": 1, "tensorboard": False})
    raw = yaml.safe_load(recipe.read_text())
    raw["out"] = str(root / "run")
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["distill", str(recipe)]) == 0
    assert main(["export", str(root / "run"), "--int8", "--calib-size", "16"]) == 0
    return root / "run" / "export"
