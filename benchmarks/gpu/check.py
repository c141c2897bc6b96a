"""The GPU check: every CUDA path of edgedistill in one time-boxed run, figures and log written to ``--out``.

    python benchmarks/gpu/check.py --out "$OUT"          # on the GPU machine (run_check.sh installs the wheels)
    python benchmarks/gpu/check.py --dry-run --out /tmp/o  # anywhere: tiny sizes, CUDA-only parts skipped

Steps, in order (steps.py): env, encoders (student vs teacher throughput: first after env, so the figure the
GPU time is mostly for lands even when a later step eats the budget), gpu_tests (pytest -m gpu), data
(edgedistill data scenes), distill_resume (AMP distillation killed mid-run and resumed, against a whole run),
cache_build (teacher fp32 vs bf16 autocast), epoch (cached vs online teacher), bench (export + bench --device cuda).

A worker process runs the steps one after the other; this process watches it. A step that outlives its time
box is killed with everything it started, recorded as ``timeout``, and a fresh worker carries on with the next
step; a step that fails is recorded and the next one runs. Nothing starts once the overall budget is spent.
Output (at most 8 files, no folders): results.json, check.log, steps.csv, resume.csv, cache_epoch.csv,
encoders.csv, bench.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@dataclass(frozen=True)
class Step:
    name: str
    box_s: float                      # time box on the GPU machine
    needs: tuple[str, ...] = ()       # steps whose success it needs


# encoders needs nothing but env's imports: it runs first after env (a minute of machine checks), so its
# measurement comes back even when a later step hangs or the budget runs out
STEPS = (Step("env", 60), Step("encoders", 100), Step("gpu_tests", 170), Step("data", 60),
         Step("distill_resume", 150, ("data",)), Step("cache_build", 100, ("data",)), Step("epoch", 100, ("data",)),
         Step("bench", 110, ("distill_resume",)))
BUDGET_S = 480.0      # the whole check: 8 minutes
MIN_START_S = 15.0    # no step starts with less of the budget left
POLL_S = 0.2


# ------------------------------------------------------------------------------------------------ worker
def result_path(work: Path, name: str) -> Path:
    return work / "results" / f"{name}.json"


def write_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)  # the watcher never reads half a file


def run_worker(names: list[str], work: Path, out: Path, dry: bool, compile_: bool, boxes: dict[str, float]) -> int:
    """Run ``names`` in order; before each, progress.json says which and since when; after, its result file."""
    sys.path.insert(0, str(HERE))
    import steps

    import torch
    cuda = torch.cuda.is_available() and not dry
    ctx = steps.Context(work=work, out=out, dry=dry, cuda=cuda, compile=compile_,
                        sizes=steps.Sizes.dry() if dry else steps.Sizes())
    by_name = {s.name: s for s in STEPS}
    for name in names:
        write_json(work / "progress.json", {"step": name, "started": time.time()})
        print(f"\n===== step {name} =====", flush=True)
        t = time.perf_counter()
        missing = [n for n in by_name[name].needs if _status(work, n) != "ok"]
        try:
            if missing:
                result = steps.failed(f"needs {', '.join(missing)}, which did not succeed")
            else:
                fn = getattr(steps, f"step_{name}")
                takes_box = "timeout_s" in fn.__code__.co_varnames[:fn.__code__.co_argcount]
                result = fn(ctx, boxes[name]) if takes_box else fn(ctx)
        except Exception as e:  # noqa: BLE001 - recorded; the next step runs
            traceback.print_exc()
            result = steps.failed(f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}")
        result["seconds"] = round(time.perf_counter() - t, 2)
        write_json(result_path(work, name), result)
        print(f"===== step {name}: {result['status']} ({result['seconds']} s): {result.get('message', '')}",
              flush=True)
    return 0


def _status(work: Path, name: str) -> str | None:
    path = result_path(work, name)
    return json.loads(path.read_text()).get("status") if path.is_file() else None


# ------------------------------------------------------------------------------------------------ watcher
def _read_progress(work: Path) -> dict[str, Any] | None:
    try:
        return json.loads((work / "progress.json").read_text())
    except (OSError, ValueError):
        return None


def _kill(proc: subprocess.Popen) -> None:
    """The worker and everything it started (its own process group, so nothing else)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def orchestrate(names: list[str], boxes: dict[str, float], work: Path, budget_s: float,
                spawn: Callable[[list[str]], subprocess.Popen], say: Callable[[str], None]) -> dict[str, dict]:
    """Run ``names`` through workers from ``spawn``, each step within its box and all within ``budget_s``."""
    deadline = time.time() + budget_s
    remaining = list(names)
    while remaining:
        if deadline - time.time() < MIN_START_S:
            for name in remaining:
                write_json(result_path(work, name), {"status": "skipped", "message": "the check's budget was spent"})
            break
        (work / "progress.json").unlink(missing_ok=True)
        proc = spawn(remaining)
        killed: tuple[str, str] | None = None
        while proc.poll() is None:
            time.sleep(POLL_S)
            progress = _read_progress(work)
            if progress is None or result_path(work, progress["step"]).is_file():
                continue
            step, started = progress["step"], float(progress["started"])
            limit = min(started + boxes[step], deadline)
            if time.time() > limit:
                _kill(proc)
                why = "time box" if limit < deadline else "check's budget"
                killed = (step, f"killed after {time.time() - started:.0f} s: past its {why} "
                                f"({limit - started:.0f} s)")
        done = [n for n in remaining if result_path(work, n).is_file()]
        current = (killed or ((_read_progress(work) or {}).get("step"), None))[0]
        if current in remaining and current not in done:
            message = killed[1] if killed else f"the worker died (exit status {proc.returncode})"
            write_json(result_path(work, current), {"status": "timeout" if killed else "failed",
                                                    "message": message})
            say(f"step {current}: {message}")
        elif not done:  # died before it started anything: nothing to blame, do not loop
            for name in remaining:
                write_json(result_path(work, name), {"status": "failed", "message":
                                                     f"the worker exited with {proc.returncode} before starting"})
        remaining = [n for n in remaining if not result_path(work, n).is_file()]
    return {n: json.loads(result_path(work, n).read_text()) for n in names}


# ------------------------------------------------------------------------------------------------ report
CSV_FILES = {"resume.csv": ("distill_resume",), "cache_epoch.csv": ("cache_build", "epoch"),
             "encoders.csv": ("encoders",)}


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields or ["empty"])
        writer.writeheader()
        writer.writerows(rows)


def write_report(out: Path, results: dict[str, dict], meta: dict[str, Any]) -> None:
    steps_rows = [{"step": n, "status": r.get("status"), "seconds": r.get("seconds"), "message": r.get("message")}
                  for n, r in results.items()]
    write_csv(out / "steps.csv", steps_rows)
    for name, sources in CSV_FILES.items():
        write_csv(out / name, [{"source": s, **row} for s in sources for row in results.get(s, {}).get("rows", [])])
    write_json(out / "results.json", {**meta, "steps": results})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", choices=["check", "worker"], default="check", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check-out")))
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU; CUDA-only parts skipped")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd encoders")
    ap.add_argument("--only", default=None, help="comma-separated steps to run (default: all)")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check")
    ap.add_argument("--steps", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="edgedistill-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    boxes = {s.name: s.box_s for s in STEPS}
    if args.mode == "worker":
        return run_worker(args.steps.split(","), work, args.out, args.dry_run, args.compile, boxes)
    names = [s.name for s in STEPS if args.only is None or s.name in args.only.split(",")]
    log = open(args.out / "check.log", "a", buffering=1)
    try:
        return _check(args, names, boxes, work, log)
    finally:
        log.close()


def _check(args: argparse.Namespace, names: list[str], boxes: dict[str, float], work: Path, log: TextIO) -> int:
    def say(line: str) -> None:
        print(line, flush=True)
        log.write(line + "\n")

    def spawn(todo: list[str]) -> subprocess.Popen:
        cmd = [sys.executable, str(HERE / "check.py"), "worker", "--steps", ",".join(todo), "--work", str(work),
               "--out", str(args.out), *(["--dry-run"] if args.dry_run else []),
               *(["--compile"] if args.compile else [])]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg",
               "EDGEDISTILL_CACHE": str(work / "cache-root"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    started = time.time()
    say(f"GPU check{' (dry run)' if args.dry_run else ''}: steps {', '.join(names)}; budget {args.budget:.0f} s; "
        f"work {work}; out {args.out}")
    results = orchestrate(names, boxes, work, args.budget, spawn, say)
    meta = {"dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)) + " UTC",
            "seconds": round(time.time() - started, 1), "budget_s": args.budget, "work": str(work)}
    write_report(args.out, results, meta)
    for name, r in results.items():
        say(f"{name:<15} {r.get('status'):<8} {r.get('seconds', '-'):>7} s  {r.get('message', '')}")
    bad = [n for n, r in results.items() if r.get("status") not in ("ok", "skipped")]
    say(f"done in {meta['seconds']} s; " + (f"not ok: {', '.join(bad)}" if bad else "every step ok or skipped"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
