"""Scale-out with torch.distributed (docs/design.md#scale-out): the process group, rank helpers, gathers, the launcher.

A distributed run is the same ``edgedistill distill RECIPE`` started by ``torchrun`` (which sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or by ``edgedistill distill RECIPE --nproc N``, which runs
``torch.distributed.run`` for the user on one machine. NCCL on GPUs, gloo on CPU. One process is one rank; the
recipe's ``data.batch_size`` stays the global batch.

How the trainer keeps a run of N processes equal to a run of one process with the same global batch:

- every rank takes a contiguous slice of each global batch (``EpochBatches`` in train.py);
- the batch's embeddings are gathered (``gather_with_grad``), and every rank computes the *same* loss on the
  whole batch, so balancer state, the teacher queue and skip decisions stay identical on every rank;
- ``gather_with_grad`` returns ``world_size x`` the gradient of the local rows, so DDP's gradient average is
  the gradient of that one global loss.

Collectives time out after ``EDGEDISTILL_DIST_TIMEOUT`` seconds (default 1800): a rank that dies or hangs
stops the others with a clear message instead of a silent hang.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from edgedistill.core.errors import UserError

TIMEOUT_ENV = "EDGEDISTILL_DIST_TIMEOUT"   # seconds a collective may wait for the other ranks
DEFAULT_TIMEOUT_S = 1800
LAUNCHED_ENV = "EDGEDISTILL_LAUNCHED"     # set by `--nproc` for its workers
LOST_CONTACT_EXIT = 3                     # a worker's exit status when a collective failed (another rank died)


@dataclass(frozen=True)
class Context:
    """Where this process stands in the run: rank, world size, rank on this machine, collective device."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")   # the device collectives run on (cuda:LOCAL_RANK with NCCL)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """WORLD_SIZE set by torchrun (1 when this process was not started by a launcher)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def env_rank() -> int:
    """RANK set by torchrun (0 outside a distributed run); usable before the process group exists."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    return datetime.timedelta(seconds=seconds)


def current() -> Context:
    """This process's Context (rank 0 of 1 when no process group is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    nccl = dist.get_backend() == "nccl"
    return Context(dist.get_rank(), dist.get_world_size(), local,
                   torch.device("cuda", local) if nccl else torch.device("cpu"))


def _wants_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def init_from_env(device: str = "auto") -> Context:
    """Join the process group torchrun describes in the environment; a no-op for a single process.

    ``device`` is the recipe's device: CUDA (or auto with a GPU) -> NCCL and one GPU per process
    (cuda:LOCAL_RANK); cpu -> gloo. Idempotent.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    world = launched_world_size()
    if world <= 1:
        return Context()
    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed; run a single process (without torchrun)")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "gloo"
    if _wants_cuda(device):
        if not torch.cuda.is_available():
            raise UserError(f"device {device}: no CUDA GPU is visible to rank {env_rank()}; set device=cpu to run "
                            "the processes on the CPU (gloo)")
        if local >= torch.cuda.device_count():
            raise UserError(f"{launched_world_size()} processes but only {torch.cuda.device_count()} GPUs on this "
                            f"machine: start one process per GPU (--nproc / --nproc_per_node "
                            f"{torch.cuda.device_count()})")
        torch.cuda.set_device(local)
        backend = "nccl"
    dist.init_process_group(backend, timeout=timeout())
    return current()


def cleanup() -> None:
    """Leave the process group (safe to call when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: str, ctx: Context) -> str:
    """The recipe's device for this rank: with NCCL each process drives the GPU of its local rank."""
    if ctx.enabled and ctx.device.type == "cuda":
        return str(ctx.device)
    return device


# ------------------------------------------------------------------------------------------- collectives


def barrier() -> None:
    ctx = current()
    if ctx.enabled:
        if ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; for small things: decisions, metrics)."""
    ctx = current()
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=ctx.device)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one (e.g. a Ctrl-C seen by one process)."""
    ctx = current()
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_sizes(n: int) -> list[int]:
    """Every rank's ``n``, in rank order."""
    ctx = current()
    if not ctx.enabled:
        return [n]
    t = torch.tensor([n], dtype=torch.long, device=ctx.device)
    out = [torch.zeros_like(t) for _ in range(ctx.world_size)]
    dist.all_gather(out, t)
    return [int(x.item()) for x in out]


def all_gather_rows(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Concatenate every rank's rows (rank order): x (n_r, ...) with n_r = sizes[r] -> (sum(sizes), ...).

    Ranks may hold different numbers of rows (0 included); no gradient flows back (see ``gather_with_grad``).
    """
    ctx = current()
    if not ctx.enabled:
        return x
    if x.shape[0] != sizes[ctx.rank]:
        raise AssertionError(f"rank {ctx.rank} holds {x.shape[0]} rows, sizes say {sizes[ctx.rank]}")
    comm = x.detach().to(ctx.device)
    most = max(sizes)
    if comm.shape[0] < most:  # all_gather needs equal shapes: pad, then cut each part back
        pad = comm.new_zeros((most - comm.shape[0], *comm.shape[1:]))
        comm = torch.cat([comm, pad])
    parts = [torch.empty_like(comm) for _ in range(ctx.world_size)]
    dist.all_gather(parts, comm.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(x.device)


class _GatherRows(torch.autograd.Function):
    """all_gather of rows whose backward keeps this rank's slice of the gradient, scaled by the world size."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sizes: list[int], rank: int, world: int) -> torch.Tensor:
        ctx.start, ctx.n, ctx.world = sum(sizes[:rank]), sizes[rank], world
        return all_gather_rows(x, sizes)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        # Every rank computes the same loss of the gathered rows, so each holds the same gradient: no
        # communication is needed, and x world_size makes DDP's average the gradient of that one loss.
        return grad[ctx.start:ctx.start + ctx.n] * ctx.world, None, None, None


def gather_with_grad(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Every rank's rows of ``x`` (n_r, D) -> (sum(sizes), D), keeping autograd for this rank's rows.

    Contract: every rank computes the same function of the result (the trainer's global-batch loss); the
    gradient of the local rows comes back multiplied by the world size, so that DDP's gradient *average*
    equals the gradient a single process gets for the whole batch. Identity with one process.
    """
    ctx = current()
    if not ctx.enabled:
        return x
    return _GatherRows.apply(x, list(sizes), ctx.rank, ctx.world_size)


def all_reduce_mean(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Element-wise mean over ranks of each tensor (new tensors; the inputs are untouched)."""
    ctx = current()
    if not ctx.enabled or not tensors:
        return tensors
    flat = torch.cat([t.detach().reshape(-1).to(ctx.device, torch.float32) for t in tensors])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()].view_as(t).to(device=t.device, dtype=t.dtype))
        i += t.numel()
    return out


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` under DistributedDataParallel in a distributed run; the module itself otherwise.

    ``find_unused_parameters``: a step's total may not reach every parameter; DDP then leaves the gradient of a
    parameter no rank used at None, as one process would. No buffer sync in forward: the state the losses and the
    balancer keep is identical on every rank by construction, and rank 0's BatchNorm running statistics are saved.
    """
    if not current().enabled:
        return module
    no_sync = {"forward_sync_buffers": False} \
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else {"broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True, **no_sync)


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes an index or a cache); the others run it once it is done."""
    ctx = current()
    if ctx.enabled and not ctx.is_main:
        barrier()
    yield
    if ctx.enabled and ctx.is_main:
        barrier()


def is_comm_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because another rank died, hung or lost its connection."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("gloo", "NCCL", "Connection closed", "Connection reset", "Timed out", "timed out",
                            "Broken pipe"))


# ------------------------------------------------------------------------------------------- launcher


def launch_distill(recipe: Any, nproc: int, args: Sequence[str], resume: bool) -> int:
    """``edgedistill distill RECIPE [overrides] --nproc N``: the same command in N processes; its exit status.

    ``recipe`` is the resolved Recipe (already validated here, so a bad recipe is reported once), ``args`` the
    recipe path and overrides as given.
    """
    if launched_world_size() > 1:
        raise UserError("--nproc inside a torchrun worker: drop --nproc (torchrun already started the processes)")
    if _wants_cuda(recipe.device) and torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise UserError(f"--nproc {nproc} but this machine has {torch.cuda.device_count()} GPUs: use one process "
                        f"per GPU, or device=cpu")
    worker = ["distill", *args, *(["--resume"] if resume else []), *(["--debug"] if "--debug" in sys.argv else [])]
    return launch(nproc, worker, Path(recipe.out))


def launch(nproc: int, worker_args: Sequence[str], run_dir: Path | None = None) -> int:
    """Run ``edgedistill WORKER_ARGS`` in ``nproc`` processes on this machine through torch.distributed.run.

    torchrun runs in a child process in its own session: Ctrl-C (SIGINT) and SIGTERM reach it once, from
    here, and it passes them to its workers, which finish the step and save a checkpoint. Returns the exit
    status to use: 0, 2 (a user error, already printed by a worker), 130 (interrupted) or 1.
    """
    cmd = [sys.executable, "-m", "edgedistill.distill.distributed", "--nproc", str(nproc)]
    if run_dir is not None:
        cmd += ["--run-dir", str(run_dir)]
    cmd += ["--", *worker_args]
    # TORCH_CPP_LOG_LEVEL: DDP's C++ notes (e.g. on find_unused_parameters) are not for the user; errors still show.
    # OMP_NUM_THREADS: torchrun would give every process 1 thread; share the cores out instead.
    env = {**os.environ, LAUNCHED_ENV: "1", "TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    child = subprocess.Popen(cmd, start_new_session=True, env=env)

    def forward(signum: int, frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code if code >= 0 else 128 - code


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def failure_line(failures: dict[int, Any], run_dir: Path | None) -> tuple[str, int]:
    """One line naming the first rank that stopped and why, and the exit status to return.

    ``failures``: torchrun's ChildFailedError.failures, {global rank: ProcessFailure} (exitcode < 0 = signal).
    """
    codes = {rank: int(f.exitcode) for rank, f in failures.items()}
    if codes and all(c == 130 for c in codes.values()):
        return "", 130
    resume = "the last checkpoint " + (f"({run_dir / 'checkpoints' / 'last.pt'}) " if run_dir is not None else "") \
        + "is intact: add --resume to continue"
    # The launcher stops the other workers with SIGTERM once one fails, and a worker whose collective failed
    # exits with LOST_CONTACT_EXIT: those are consequences, not the cause.
    consequences = {-signal.SIGTERM, 128 + signal.SIGTERM, LOST_CONTACT_EXIT}
    causes = [r for r in failures if codes[r] not in consequences]
    if not causes and LOST_CONTACT_EXIT in codes.values():
        return (f"the processes lost contact with each other (a rank hangs or its connection broke; collectives "
                f"wait {timeout().total_seconds():.0f} s, {TIMEOUT_ENV}); {resume}"), 1
    first = min(causes or list(failures), key=lambda r: (getattr(failures[r], "timestamp", 0), r))
    code = codes[first]
    if code < 0:
        return f"rank {first} stopped (killed by signal {-code}, {_signal_name(code)}); {resume}", 1
    if code == 2:
        if codes.get(0) == 2:
            return "", 2  # rank 0 printed the error line itself
        return f"rank {first} stopped with an error (exit status 2; add --debug to see it); {resume}", 2
    return f"rank {first} stopped with exit status {code} (see its output above); {resume}", 1


def _launcher_main(argv: list[str]) -> int:
    """``python -m edgedistill.distill.distributed --nproc N [--run-dir DIR] -- ARGS``: torchrun, with one-line failures."""

    # torchrun's own log lines (and its multi-line failure report) are replaced by one line below. Its loggers
    # read LOGLEVEL when they are made, on import.
    os.environ.setdefault("LOGLEVEL", "CRITICAL")
    from torch.distributed import run as torchrun  # deferred: only the --nproc launcher needs torchrun's machinery
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    parser = argparse.ArgumentParser(prog="python -m edgedistill.distill.distributed")
    parser.add_argument("--nproc", type=int, required=True)
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    opts = parser.parse_args(argv)
    worker = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    args = torchrun.parse_args(["--standalone", "--nproc_per_node", str(opts.nproc), "-m", "edgedistill", *worker])
    try:
        torchrun.run(args)
        return 0
    except ChildFailedError as e:
        line, code = failure_line(e.failures, opts.run_dir)
        if line:
            sys.stderr.write(f"error: {line}\n")
        return code
    except (SignalException, KeyboardInterrupt):
        return 130


if __name__ == "__main__":
    sys.exit(_launcher_main(sys.argv[1:]))
