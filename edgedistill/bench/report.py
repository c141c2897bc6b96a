"""The bench report: bench.json (one row per artifact x backend x batch), bench.md, pareto.png, a rich table.

Every row names its conditions (docs/design.md#conditions-on-every-number): device, backend and version,
precision, batch, threads, warm-up and iteration counts. Skipped and failed artifacts are rows too, with the
reason. Next to the rows: ``versus_teacher`` (latency ratios from interleaved rounds, with their spread),
``footprint`` (everything a device holds: image encoder, text encoder, tokenizer files) and ``timing_load`` (the
load average around the timing). Printed tables fit the terminal: below WIDE columns the secondary columns go
and skip/fail reasons become lines under the table.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

import edgedistill.core.atomic as atomic
from edgedistill.bench.timing import ratio_text
from edgedistill.core.gates import finite
from edgedistill.core.terminal import make_console, safe

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


def footprint(artifacts: list[dict[str, Any]], tokenizer_mb: float | None, text_is_teacher: bool,
              teacher_image_mb: float | None) -> dict[str, Any]:
    """What a device holds to run each student image artifact, and the teacher's counterpart: the image encoder,
    the text encoder (the same format, at the image's precision where there is one, else fp32) and the tokenizer
    files (both only where the export has a text tower), each part in MB with the total. A total is None when a
    part's size is unknown; the teacher's is None unless its image graph was timed here and its text tower is the
    student's (``text_is_teacher``: the export's text encoder is the teacher's own)."""
    texts = [a for a in artifacts if a.get("encoder") == "text"]
    students = {a["name"]: _device_parts(("image encoder", a["name"], a.get("size_mb")), _text_for(a, texts),
                                         tokenizer_mb)
                for a in artifacts if a.get("encoder") == "image"}
    fp32 = [t for t in texts if t.get("precision") == "fp32"]
    fp32_text = next((t for t in fp32 if t.get("format") == "onnx"), fp32[0] if fp32 else None)  # the teacher's
    teacher, note = None, None
    if teacher_image_mb is None:
        note = "the teacher's image graph was not timed here (bench --teacher)"
    elif texts and not text_is_teacher:
        note = "the student has a text tower of its own; the teacher's was not exported"
    elif texts and fp32_text is None:
        note = "the export has no fp32 text encoder to stand for the teacher's"
    else:
        teacher = _device_parts(("image encoder", "teacher_image_fp32_onnx", teacher_image_mb),
                                fp32_text if texts else None, tokenizer_mb)
    return {"students": students, "teacher": teacher, "teacher_note": note,
            "text_shared_with_teacher": bool(text_is_teacher)}


def _text_for(image: dict[str, Any], texts: list[dict[str, Any]]) -> dict[str, Any] | None:
    same_format = [t for t in texts if t.get("format") == image.get("format")] or texts
    return next((t for t in same_format if t.get("precision") == image.get("precision")),
                next((t for t in same_format if t.get("precision") == "fp32"), same_format[0] if same_format else None))


def _device_parts(image: tuple[str, str, Any], text: dict[str, Any] | None, tokenizer_mb: float | None
                  ) -> dict[str, Any]:
    parts = [dict(zip(("part", "name", "mb"), image))]
    if text is not None:
        parts += [{"part": "text encoder", "name": text["name"], "mb": text.get("size_mb")},
                  {"part": "tokenizer files", "name": "tokenizer/", "mb": tokenizer_mb}]
    complete = all(finite(p["mb"]) for p in parts)
    return {"parts": parts, "total_mb": round(sum(p["mb"] for p in parts), 3) if complete else None}


def size_ratio(teacher: dict[str, Any] | None, student: dict[str, Any] | None) -> dict[str, Any]:
    """Teacher / student size from two ``footprint`` entries: of the totals (what the claim uses) and of the
    image encoders alone; None where a size is missing."""
    def ratio(t: Any, s: Any) -> float | None:
        return round(t / s, 2) if finite(t) and finite(s) and s > 0 else None
    t, s = teacher or {}, student or {}
    return {"total_ratio": ratio(t.get("total_mb"), s.get("total_mb")),
            "image_ratio": ratio(*[(x.get("parts") or [{}])[0].get("mb") for x in (t, s)]),
            "teacher_total_mb": t.get("total_mb"), "student_total_mb": s.get("total_mb")}


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
    return "\n".join(lines + _versus_markdown(report) + _footprint_markdown(report) + _load_markdown(report))


def _versus_markdown(report: dict[str, Any]) -> list[str]:
    versus = report.get("versus_teacher") or []
    if not versus:
        return []
    lines = ["## Student vs teacher", "",
             "Latency: teacher p50 / student p50 per round, the models taking turns in each round; median "
             "(min-max). Size: everything the device holds (image encoder + text encoder + tokenizer files).", "",
             "| student | teacher | backend | batch | faster | smaller (total) | smaller (image encoder) |",
             "|---|---|---|---:|---|---:|---:|"]
    for v in versus:
        size = v.get("size") or {}
        lines.append(f"| {v['student']} | {v['teacher']} | {v['backend']} | {v['batch']} | "
                     f"{ratio_text(v.get('latency_ratio'), '')} | {_x(size.get('total_ratio'))} | "
                     f"{_x(size.get('image_ratio'))} |")
    return lines + [""]


def _footprint_markdown(report: dict[str, Any]) -> list[str]:
    foot = report.get("footprint") or {}
    entries = [(name, f) for name, f in (foot.get("students") or {}).items()]
    if foot.get("teacher"):
        entries.insert(0, ("teacher", foot["teacher"]))
    if not entries:
        return []
    lines = ["## Size on the device (MB)", "", "| model | image encoder | text encoder | tokenizer files | total |",
             "|---|---:|---:|---:|---:|"]
    for name, f in entries:
        mb = {p["part"]: p["mb"] for p in f["parts"]}
        lines.append(f"| {name} | {_fmt(mb.get('image encoder'))} | {_fmt(mb.get('text encoder'))} | "
                     f"{_fmt(mb.get('tokenizer files'))} | {_fmt(f['total_mb'])} |")
    note = foot.get("teacher_note")
    return lines + (["", f"Teacher: {note}."] if note else []) + [""]


def _load_markdown(report: dict[str, Any]) -> list[str]:
    load = report.get("timing_load")
    if not load:
        return []
    line = (f"Load while timing: 1-minute load average {_fmt(load['load1_before'])} before, "
            f"{_fmt(load['load1_after'])} after, {load['cpus']} usable CPUs, {load['own_threads']} of our own threads.")
    return [line + (f" Warning: {load['warning']}." if load.get("warning") else ""), ""]


def _x(ratio: Any) -> str:
    return f"{ratio:.2f}x" if finite(ratio) else "-"


MARKERS = {"onnxruntime": "o", "openvino": "s", "pytorch": "^", "tensorrt": "D", "torch": "v"}


def pareto_rows(report: dict[str, Any]) -> tuple[list[dict[str, Any]], int | None]:
    """The image-encoder rows plotted (timed, with an accuracy) at the smallest batch, and that batch."""
    rows = [r for r in report["rows"] if r["status"] == "ok" and r["encoder"] == "image" and r["p50_ms"] is not None
            and headline(r) is not None]
    batch = min((r["batch"] for r in rows), default=None)
    return [r for r in rows if r["batch"] == batch], batch


def pareto_figure(report: dict[str, Any]) -> tuple[Any, int | None]:
    """Accuracy vs p50 latency of every image encoder (teacher included) at the smallest batch: the Figure and the
    batch. Each point has its own marker (shape: backend, star: teacher) named in a legend under the axes, so
    labels never overlap; the latency axis has several labelled ticks whatever its span."""
    import matplotlib  # deferred: heavy, and only the plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, batch = pareto_rows(report)
    fig, ax = plt.subplots(figsize=(7.5, 4.6 + 0.22 * math.ceil(len(rows) / 2)))
    label = "accuracy"
    colours = iter(c for c in plt.get_cmap("tab10").colors if c != plt.get_cmap("tab10").colors[3])
    for r in sorted(rows, key=lambda r: (r["role"] != "teacher", r["p50_ms"])):
        label, acc = headline(r)
        teacher = r["role"] == "teacher"
        marker = "*" if teacher else MARKERS.get(str(r["backend"]).split("-")[0], "o")
        ax.scatter(r["p50_ms"], acc, marker=marker, s=170 if teacher else 60, zorder=3, edgecolors="black",
                   linewidths=0.5, color="tab:red" if teacher else next(colours, "tab:gray"),
                   alpha=0.85 if teacher else 1.0, label=f"{safe(r['artifact'])} on {r['backend']}: "
                                                         f"{r['p50_ms']:.3g} ms, {acc:.1f}")
    if not any(r["role"] == "teacher" for r in rows):  # a teacher scored but not timed: a reference line
        for r in report["rows"]:
            if r["role"] == "teacher" and r["p50_ms"] is None and headline(r) is not None:
                label, acc = headline(r)
                ax.axhline(acc, color="tab:red", linestyle="--", linewidth=1, label=f"teacher (not timed): {acc:.1f}")
                break
    _latency_axis(ax, [r["p50_ms"] for r in rows])
    ax.set_xlabel(f"p50 latency, batch {batch} (ms{', log scale' if ax.get_xscale() == 'log' else ''})"
                  if batch else "p50 latency (ms)")
    ax.set_ylabel(label)
    ax.set_title(safe(report["device_line"]), fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=7, frameon=False)
    fig.tight_layout()
    return fig, batch


def _latency_axis(ax: Any, latencies: list[float]) -> None:
    """A log axis with 1-2-5 ticks where the latencies span a decade or more (any such span holds at least three);
    a linear axis with about six ticks where they do not."""
    import matplotlib.ticker as ticker  # deferred with matplotlib

    spread = [v for v in latencies if finite(v) and v > 0]
    if spread and max(spread) / min(spread) >= 10:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    else:
        ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=6, min_n_ticks=3))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        if spread:
            pad = max((max(spread) - min(spread)) * 0.15, max(spread) * 0.05)
            ax.set_xlim(max(0.0, min(spread) - pad), max(spread) + pad)


def pareto_plot(report: dict[str, Any], path: Path) -> int | None:
    """``pareto_figure`` written to ``path`` as a PNG; the batch plotted."""
    import matplotlib.pyplot as plt  # deferred: heavy, and only the plot needs it

    fig, batch = pareto_figure(report)
    try:
        with atomic.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
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


WIDE = 130  # columns the full table needs; below it the narrow one (the rest is in bench.md and bench.json)
SHORT_BACKENDS = (("onnxruntime", "ort"), ("openvino", "ov"), ("pytorch", "pt"), ("torch-tensorrt", "torch-trt"),
                  ("tensorrt", "trt"))


def print_table(report: dict[str, Any], console: Console) -> None:
    """The rows as a table that fits the console (every column from WIDE columns up, else the main ones with short
    backend names), the skip/fail reasons as lines under it, then the ratios against the teacher."""
    if not console.is_terminal:  # a pipe or a log file: do not squeeze the table into 80 columns
        console = make_console(file=console.file, width=200)
    wide = console.width >= WIDE
    table = Table(title=f"edgedistill bench — {safe(report['device_line'])}", title_style="bold",
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    columns = (("artifact", "left"), ("backend", "left"), ("prec", "left"), ("batch", "right"), ("p50 ms", "right"),
               ("p99 ms", "right"), ("items/s", "right"), ("MB", "right"), ("R@1", "right"), ("RSUM", "right"),
               ("zero-shot", "right"), ("mJ/item", "right"), ("status", "left"))
    shown = [c for c in columns if wide or c[0] in NARROW_COLUMNS]
    for col, justify in shown:
        table.add_column(col, justify=justify, no_wrap=col != "artifact",  # type: ignore[arg-type]
                         overflow="fold")
    notes = []
    for r in report["rows"]:
        if r["status"] != "ok":
            notes.append(f"{r['status']}: {safe(r['artifact'])} on {r['backend']}: {safe(r['reason'])}")
        cells = {"artifact": safe(r["artifact"]), "backend": str(r["backend"]) if wide else _short(r["backend"]),
                 "prec": str(r["precision"] or "-"), "batch": _fmt(r["batch"]), "p50 ms": _fmt(r["p50_ms"], 3),
                 "p99 ms": _fmt(r["p99_ms"], 3), "items/s": _fmt(r["throughput_ips"], 1), "MB": _fmt(r["size_mb"]),
                 "R@1": _fmt(r["i2t_r1"], 1), "RSUM": _fmt(r["rsum"], 1), "zero-shot": _fmt(r["zs_mean_class"], 1),
                 "mJ/item": _fmt(r["energy_mj_per_item"]), "status": str(r["status"])}
        table.add_row(*[cells[c] for c, _ in shown])
    console.print(table)
    console.print("R@1: val image->text, %" + ("" if wide else "; ort onnxruntime, ov openvino, pt pytorch, trt "
                  "tensorrt; p99, items/s, zero-shot and power in bench.md"), highlight=False)
    for note in notes:
        console.print(note, highlight=False)
    for line in versus_lines(report):
        console.print(line, highlight=False)


NARROW_COLUMNS = ("artifact", "backend", "prec", "batch", "p50 ms", "MB", "R@1", "status")


def _short(backend: Any) -> str:
    name = str(backend)
    for long, short in SHORT_BACKENDS:
        if name.startswith(long):
            return short + name[len(long):]
    return name


def versus_lines(report: dict[str, Any]) -> list[str]:
    """One line per student timed against the teacher: the latency ratio with its spread, the size ratios."""
    lines = []
    for v in report.get("versus_teacher") or []:
        size = v.get("size") or {}
        smaller = (f"{size['total_ratio']:.2f}x smaller in total (image encoder alone {_x(size.get('image_ratio'))})"
                   if finite(size.get("total_ratio")) else "size vs teacher not known in total")
        lines.append(f"{safe(v['student'])} vs {safe(v['teacher'])} on {v['backend']}, batch {v['batch']}: "
                     f"{ratio_text(v.get('latency_ratio'))}; {smaller}")
    return lines


def csv_rows(report: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The rows for CSV, in ROW_FIELDS order: None as an empty cell, a nested value (``power``) as JSON."""
    return [tuple("" if r.get(k) is None else json.dumps(r[k], ensure_ascii=True, default=str)
                  if isinstance(r.get(k), (dict, list)) else r[k] for k in ROW_FIELDS) for r in report["rows"]]
