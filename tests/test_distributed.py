"""Scale-out on CPU with gloo: 2 processes equal 1 process, a killed rank, sharded caches, webdataset shards."""

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

import edgedistill.distill.distributed as distributed
from edgedistill.distill.cache import build_or_load
from edgedistill.cli import main
from edgedistill.data import shards as shards_module
from edgedistill.data.images import open_image
from edgedistill.data.manifest import load_manifest
from edgedistill.core.errors import UserError
from edgedistill.distill.recipe import TeacherConfig, load_recipe
from edgedistill.distill.teachers import load_teacher
from edgedistill.distill.train import FAULT_ENV, FAULT_RANK_ENV, EpochBatches, build_trainer
from tests.test_train import recipe_for

# A student without BatchNorm: CPU ranks cannot synchronise BatchNorm statistics (torch's SyncBatchNorm needs a
# GPU), so only a norm-per-sample tower can match one process exactly. A student text tower and another width
# exercise the gathered captions and the projection too.
EXACT = {"vision": "test_efficientnet_gn", "text": {"width": 32, "layers": 1, "heads": 2}, "embed_dim": 16}


def launch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`edgedistill ARGS` in a subprocess (one torch thread per process: the test machine is small)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: "60", **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgedistill", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def train_losses(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_each_rank_takes_a_slice_and_the_slices_make_the_single_process_batch():
    indices = np.arange(23)
    single = EpochBatches(indices, 8, seed=3)
    single.set_epoch(2)
    for world in (2, 4):
        ranks = [EpochBatches(indices, 8, seed=3, rank=r, world_size=world) for r in range(world)]
        for r in ranks:
            r.set_epoch(2)
        per_rank = [list(r) for r in ranks]
        assert all(len(p) == single.per_epoch == 2 for p in per_rank)
        for step, batch in enumerate(single):
            assert [i for p in per_rank for i in p[step]] == batch  # rank order = the batch's order
            assert {len(p[step]) for p in per_rank} == {8 // world}
    tiny = [EpochBatches(np.arange(5), 8, seed=0, rank=r, world_size=2) for r in range(2)]
    assert [list(t)[0] for t in tiny] == [x.tolist() for x in np.array_split(list(EpochBatches(
        np.arange(5), 8, seed=0))[0], 2)]  # a set smaller than one batch: one uneven batch


def test_global_batch_must_split_over_the_processes(tiny_teacher, dataset, tmp_path, monkeypatch):
    recipe, _ = recipe_for(tmp_path, tiny_teacher, dataset)
    monkeypatch.setattr(distributed, "current", lambda: distributed.Context(rank=0, world_size=3))
    with pytest.raises(UserError, match=r"data.batch_size 8 \(the global batch\) does not split over 3 "
                                        r"processes; make it a multiple of 3"):
        build_trainer(load_recipe(recipe), None, {}, {}, Console(quiet=True))  # type: ignore[arg-type]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tiny_teacher, dataset, tmp_path):
    one, one_out = recipe_for(tmp_path, tiny_teacher, dataset, name="one", student=EXACT)
    assert main(["distill", str(one)]) == 0
    two, two_out = recipe_for(tmp_path, tiny_teacher, dataset, name="two", student=EXACT,
                              cache={"dir": str(tmp_path / "cache2")})  # its own cache: built by 2 ranks
    run = launch("distill", str(two), "--nproc", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "8 (4 on each of 2 processes)" in run.stderr and "Traceback" not in run.stderr

    a, b = train_losses(one_out), train_losses(two_out)
    assert [x["step"] for x in b] == list(range(1, 11))  # one writer: every step logged once
    assert [x["loss"] for x in b] == pytest.approx([x["loss"] for x in a], rel=1e-4)
    for x, y in zip(a, b):
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-3)  # Adam alone would hide a scale error
        # fp32 sums in another order (two ranks' all-reduce; AVX-512 kernels) drift a term ~2e-4 in ten steps (Zen 4,
        # 2026-12-07); a wrong share of the batch or a scale error is off by far more
        assert y["terms"] == pytest.approx(x["terms"], rel=1e-3, abs=1e-6)
        assert y["weights"] == pytest.approx(x["weights"], rel=1e-4)  # balancer state in step
    ca = torch.load(one_out / "checkpoints" / "last.pt", weights_only=True)
    cb = torch.load(two_out / "checkpoints" / "last.pt", weights_only=True)
    # Adam turns last-bit differences of near-zero gradients into steps of up to lr: a loose bound on weights.
    for key, value in ca["model"].items():
        torch.testing.assert_close(cb["model"][key], value, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(cb["projection"]["weight"], ca["projection"]["weight"], atol=2e-3, rtol=1e-3)
    for key, value in ca["losses"].items():  # the teacher queues hold the same keys
        torch.testing.assert_close(cb["losses"][key], value, atol=1e-6, rtol=1e-5)
    summary = json.loads((two_out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 10
    assert summary["student"]["rsum"] == pytest.approx(json.loads((one_out / "summary.json").read_text())
                                                       ["student"]["rsum"], abs=10)
    # The cache built by 2 ranks (chunks of 16 dealt out in turn) equals the one built by one process.
    for split in ("train", "val"):
        built_by = {}
        for root in (tmp_path / "cache", tmp_path / "cache2"):
            (folder,) = [p for p in root.glob(f"*__{split}__*") if p.is_dir()]
            built_by[root.name] = json.loads((folder / "meta.json").read_text())["builder"].get("processes", 1)
            arrays = {n: np.load(folder / f"{n}.npy") for n in ("image_emb", "image_ok", "text_emb", "text_offsets")}
            if root.name == "cache":
                reference = arrays
            else:
                for n, arr in arrays.items():
                    np.testing.assert_array_equal(arr, reference[n], err_msg=f"{split} {n}")
        assert built_by == {"cache": 1, "cache2": 2}
        assert not list((tmp_path / "cache2").glob("*.partial"))


@pytest.mark.slow
def test_a_killed_rank_stops_the_run_and_the_run_resumes(tiny_teacher, dataset, tmp_path):
    # mobilenetv3 has BatchNorm: on CPU each rank normalises its own slice (the run works, not bit-equal).
    recipe, out = recipe_for(tmp_path, tiny_teacher, dataset, name="killed")
    killed = launch("distill", str(recipe), "--nproc", "2", env={FAULT_ENV: "7", FAULT_RANK_ENV: "1"})
    assert killed.returncode == 1, killed.stderr[-3000:]
    errors = [line for line in killed.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: rank 1 stopped (killed by signal 9, SIGKILL); the last checkpoint "
                      f"({out / 'checkpoints' / 'last.pt'}) is intact: add --resume to continue"], killed.stderr
    assert "Traceback" not in killed.stderr and "ChildFailedError" not in killed.stderr
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)  # intact: it loads
    assert ckpt["state"]["step"] == 6 and not list((out / "checkpoints").glob(".*.tmp"))
    assert not (out / "summary.json").exists()

    resumed = launch("distill", str(recipe), "--nproc", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr and "at step 6" in resumed.stderr
    assert [x["step"] for x in train_losses(out)] == list(range(1, 11))
    assert json.loads((out / "summary.json").read_text())["steps"] == 10


@pytest.mark.slow
def test_gathered_loss_gives_one_process_gradient_and_gradnorm_agrees():
    """tests/dist_worker.py in 2 gloo processes: DDP + gather_with_grad == one process; gradnorm's norms too."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(Path(__file__).with_name("dist_worker.py"))], capture_output=True, text=True,
                         timeout=300, env=env, cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert run.stdout.count(": ok") == 2


def failure(exitcode: int, timestamp: int = 100) -> types.SimpleNamespace:
    return types.SimpleNamespace(exitcode=exitcode, timestamp=timestamp)


def test_the_launcher_names_the_rank_that_stopped(tmp_path):
    run = tmp_path / "runs" / "x"
    line, code = distributed.failure_line({0: failure(-signal.SIGTERM), 1: failure(-9)}, run)
    assert code == 1 and line.startswith("rank 1 stopped (killed by signal 9, SIGKILL)")
    assert str(run / "checkpoints" / "last.pt") in line and "--resume" in line
    # Rank 0 noticed first (lost contact) but rank 3 is the cause.
    line, _ = distributed.failure_line({0: failure(distributed.LOST_CONTACT_EXIT, 99), 3: failure(1, 100)}, run)
    assert line.startswith("rank 3 stopped with exit status 1")
    assert distributed.failure_line({0: failure(130), 1: failure(130)}, run) == ("", 130)
    assert distributed.failure_line({0: failure(2), 1: failure(2)}, run) == ("", 2)  # rank 0 printed it
    line, code = distributed.failure_line({0: failure(-15), 1: failure(2)}, run)
    assert code == 2 and "rank 1 stopped with an error" in line and "--debug" in line
    line, code = distributed.failure_line({0: failure(3), 1: failure(3)}, run)
    assert code == 1 and "lost contact" in line and distributed.TIMEOUT_ENV in line


def test_nproc_inside_torchrun_is_refused(tiny_teacher, dataset, tmp_path, monkeypatch, capsys):
    recipe, _ = recipe_for(tmp_path, tiny_teacher, dataset)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["distill", str(recipe), "--nproc", "2"]) == 2
    assert "drop --nproc" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- webdataset shards


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shards(manifest: Path, folder: Path, per_shard: int = 10) -> list[Path]:
    """The images of a JSON Lines manifest as img2dataset-style shards: jpg + txt + json per sample."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    paths = []
    for s in range(0, len(rows), per_shard):
        path = folder / f"{s // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(s, min(s + per_shard, len(rows))):
                key = f"{i:09d}"
                add_member(tf, f"{key}.jpg", (manifest.parent / rows[i]["image"]).read_bytes())
                add_member(tf, f"{key}.txt", rows[i]["captions"][0].encode())
                add_member(tf, f"{key}.json", json.dumps({"caption": rows[i]["captions"][0], "key": key,
                                                          "captions": rows[i]["captions"]}).encode())
            add_member(tf, f"orphan{s}.txt", b"a caption without an image")  # skipped
        paths.append(path)
    return paths


def test_webdataset_shards_are_indexed_once_and_read_by_offset(dataset, tmp_path, monkeypatch):
    write_shards(dataset["train"], tmp_path / "shards")
    spec = str(tmp_path / "shards" / "{00000..00003}.tar")
    m = load_manifest(spec, index_dir=tmp_path / "index")
    plain = load_manifest(dataset["train"])
    assert len(m) == 40 and [e.captions for e in m.entries] == [e.captions for e in plain.entries]
    assert m.n_captions == 80  # json captions, the txt caption kept once
    assert open_image(m.entries[7].image).tobytes() == open_image(plain.entries[7].image).tobytes()
    assert m.content_hash().startswith("shards:") and len(list((tmp_path / "index").iterdir())) == 1
    assert pickle.loads(pickle.dumps(m.entries[7].image)) == m.entries[7].image  # data loader workers get it

    monkeypatch.setattr(shards_module, "_scan", lambda shard: pytest.fail("re-indexed an unchanged shard list"))
    assert load_manifest(spec, index_dir=tmp_path / "index").content_hash() == m.content_hash()
    monkeypatch.undo()
    with tarfile.open(tmp_path / "shards" / "00003.tar", "a") as tf:  # a shard grows: new key, new index
        add_member(tf, "999999999.png", (dataset["train"].parent / "images" / "img_00000.jpg").read_bytes())
        add_member(tf, "999999999.bin", bytes(30000))  # past tar's record padding: the size changes
    grown = load_manifest(spec, index_dir=tmp_path / "index")
    assert len(grown) == 41 and grown.content_hash() != m.content_hash() and grown.entries[-1].captions == ()

    for bad, message in ((tmp_path / "shards" / "{00000..00009}.tar", "shard .*00004.tar not found"),
                         ("s3://bucket/{0..9}.tar", "must be files on a mounted file system"),
                         (tmp_path / "x.tar.gz", "compressed")):
        with pytest.raises(UserError, match=message):
            load_manifest(bad, index_dir=tmp_path / "index")


@pytest.mark.slow
def test_distill_on_webdataset_shards(tiny_teacher, dataset, tmp_path):
    write_shards(dataset["train"], tmp_path / "shards")
    spec = str(tmp_path / "shards" / "{00000..00003}.tar")
    teacher = load_teacher(TeacherConfig(model=str(tiny_teacher[0]), pretrained=str(tiny_teacher[1])))
    quiet = Console(quiet=True)
    from_shards = build_or_load(teacher, load_manifest(spec, index_dir=tmp_path / "index"), tmp_path / "c",
                                batch_size=8, workers=0, chunk_size=16, console=quiet).cache
    from_files = build_or_load(teacher, load_manifest(dataset["train"]), tmp_path / "c", batch_size=8, workers=0,
                               chunk_size=16, console=quiet).cache
    assert from_shards.path != from_files.path  # keyed by the shard list and sizes
    assert np.array_equal(from_shards.image_emb, from_files.image_emb)
    assert np.array_equal(from_shards.text_emb, from_files.text_emb)

    recipe, out = recipe_for(tmp_path, tiny_teacher, {"train": spec, "val": None}, name="shards",
                             train={"epochs": 1, "max_steps": 2})
    assert main(["distill", str(recipe)]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert list((tmp_path / "cache" / "shards").glob("*.jsonl"))  # the index lives in the cache root
