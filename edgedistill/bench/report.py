"""The bench report: bench.json (one row per artifact x backend x batch), bench.md, pareto.png, a rich table.

Every row names its conditions (docs/design.md#conditions-on-every-number): device, backend and version,
precision, batch, threads, warm-up and iteration counts. Skipped and failed artifacts are rows too, with the
reason.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

import edgedistill.core.atomic as atomic
from edgedistill.core.terminal import make_console

REPORT_JSON, REPORT_MD, PARETO_PNG = "bench.json", "bench.md", "pareto.png"
ROW_FIELDS = ("artifact", "role", "encoder", "format", "precision", "backend", "backend_version", "device",
              "threads", "batch", "warmup", "iters", "mode", "load", "p50_ms", "p90_ms", "p99_ms", "mean_ms",
              "std_ms", "throughput_ips", "peak_mem_mb", "peak_mem_kind", "size_mb", "avg_power_w",
              "energy_mj_per_item", "power", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
              "zs_top1", "zs_mean_class", "status", "reason")
ACCURACY = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "zs_top1", "zs_mean_class")


def make_row(**fields: Any) -> dict[str, Any]:
    """A report row with every field present (None where not measured), in the documented order."""
    unknown = set(fields) - set(ROW_FIELDS)
    if unknown:
        raise ValueError(f"unknown report fields {sorted(unknown)}")
    return {k: fields.get(k) for k in ROW_FIELDS}


def headline(row: dict[str, Any]) -> tuple[str, float] | None:
    """The accuracy a row is plotted by: image->text R@1 when there are captions, else zero-shot mean per class."""
    for key, label in (("i2t_r1", "val image->text R@1 (%)"), ("zs_mean_class", "val zero-shot mean per-class (%)")):
        if row.get(key) is not None:
            return label, float(row[key])
    return None


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    cond = report["conditions"]
    lines = [f"# edgedistill bench — {report['export_dir']}", "",
             f"- device: {report['device_line']}",
             f"- date: {report['created']}; warm-up {cond['warmup']}, {cond['iters']} timed iterations per batch; "
             f"mode: {cond['mode']}; threads: {cond['threads']}",
             f"- accuracy: {report.get('accuracy_note') or 'val split ' + str(report.get('val'))}", "",
             "| artifact | backend | precision | batch | p50 ms | p90 ms | p99 ms | items/s | size MB | peak MB "
             "| i2t R@1 | t2i R@1 | RSUM | zero-shot | power W | mJ/item | status |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        lines.append("| " + " | ".join([
            str(r["artifact"]), f"{r['backend']} {r['backend_version'] or ''}".strip(), str(r["precision"] or "-"),
            _fmt(r["batch"]), _fmt(r["p50_ms"], 3), _fmt(r["p90_ms"], 3), _fmt(r["p99_ms"], 3),
            _fmt(r["throughput_ips"], 1), _fmt(r["size_mb"]), _fmt(r["peak_mem_mb"], 0), _fmt(r["i2t_r1"], 1),
            _fmt(r["t2i_r1"], 1), _fmt(r["rsum"], 1), _fmt(r["zs_mean_class"], 1), _fmt(r["avg_power_w"]),
            _fmt(r["energy_mj_per_item"]), status.replace("|", "/")]) + " |")
    lines += ["", f"Plot: {PARETO_PNG} (accuracy vs batch-{report['pareto_batch']} p50 latency)." if
              report.get("pareto_batch") else "", ""]
    return "\n".join(lines)


def pareto_plot(report: dict[str, Any], path: Path) -> int | None:
    """Accuracy vs p50 latency of every image encoder (teacher included) at the smallest batch; the batch used."""
    import matplotlib  # deferred: heavy, and only the plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (formatters below)

    rows = [r for r in report["rows"] if r["status"] == "ok" and r["encoder"] == "image" and r["p50_ms"] is not None
            and headline(r) is not None]
    batch = min((r["batch"] for r in rows), default=None)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    label = "accuracy"
    for r in rows:
        if r["batch"] != batch:
            continue
        label, acc = headline(r)
        teacher = r["role"] == "teacher"
        ax.scatter(r["p50_ms"], acc, marker="*" if teacher else "o", s=160 if teacher else 50,
                   color="tab:red" if teacher else "tab:blue", zorder=3)
        ax.annotate(f"{r['artifact']}\n{r['backend']}", (r["p50_ms"], acc), textcoords="offset points",
                    xytext=(6, 4), fontsize=7)
    timed_teacher = any(r["role"] == "teacher" for r in rows)
    for r in report["rows"]:  # a teacher that was scored but not timed: a reference line
        if not timed_teacher and r["role"] == "teacher" and r["p50_ms"] is None and headline(r) is not None:
            label, acc = headline(r)
            ax.axhline(acc, color="tab:red", linestyle="--", linewidth=1, label=f"teacher ({acc:.1f})")
            ax.legend(loc="lower right", fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(f"p50 latency, batch {batch} (ms, log scale)" if batch else "p50 latency (ms)")
    ax.set_ylabel(label)
    ax.set_title(f"{report['device_line']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return batch


def write_report(out: Path, report: dict[str, Any]) -> dict[str, Path]:
    """bench.json, pareto.png and bench.md in ``out``, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    report.setdefault("created", dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    report["pareto_batch"] = pareto_plot(report, out / PARETO_PNG)
    atomic.write_text(out / REPORT_JSON, json.dumps(report, indent=2, default=str) + "\n")
    atomic.write_text(out / REPORT_MD, markdown(report))
    return {"json": out / REPORT_JSON, "md": out / REPORT_MD, "png": out / PARETO_PNG}


def print_table(report: dict[str, Any], console: Console) -> None:
    if not console.is_terminal:  # a pipe or a log file: do not squeeze the table into 80 columns
        console = make_console(file=console.file, width=200)
    table = Table(title=f"edgedistill bench — {report['device_line']}", title_style="bold")
    for col, justify in (("artifact", "left"), ("backend", "left"), ("prec", "left"), ("batch", "right"),
                         ("p50 ms", "right"), ("p99 ms", "right"), ("items/s", "right"), ("MB", "right"),
                         ("i2t R@1", "right"), ("RSUM", "right"), ("zero-shot", "right"), ("mJ/item", "right"),
                         ("status", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in report["rows"]:
        status = Text("ok") if r["status"] == "ok" else Text.assemble((str(r["status"]), "yellow"), f": {r['reason']}")
        table.add_row(str(r["artifact"]), str(r["backend"]), str(r["precision"] or "-"), _fmt(r["batch"]),
                      _fmt(r["p50_ms"], 3), _fmt(r["p99_ms"], 3), _fmt(r["throughput_ips"], 1), _fmt(r["size_mb"]),
                      _fmt(r["i2t_r1"], 1), _fmt(r["rsum"], 1), _fmt(r["zs_mean_class"], 1),
                      _fmt(r["energy_mj_per_item"]), status)
    console.print(table)
