"""Honest speed and size claims, and output people can read: ratios with their spread from interleaved rounds, the
load warning, sizes of everything a device holds, tables that fit 80 columns, plots with readable ticks and labels.
No wall-clock time is asserted: the arithmetic runs on given numbers, the load average is patched."""

import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from rich.console import Console

import edgedistill.bench.timing as timing
import edgedistill.cli as cli
from edgedistill import demo
from edgedistill.bench import report as rep
from edgedistill.bench.timing import busy_by_others, interleave, load_average, ratio_spread, ratio_text
from edgedistill.cli import main
from edgedistill.runtime.sheets import Hit, _grid, _label, png_sheet

PNG = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------ ratios
def test_a_ratio_is_the_median_of_per_round_ratios_with_its_range():
    teacher = [3.0, 2.4, 3.4, 2.9, 2.6]
    student = [1.0, 1.0, 1.0, 1.0, 1.3]
    r = ratio_spread(teacher, student)
    assert r.per_round == [3.0, 2.4, 3.4, 2.9, 2.0]
    assert (r.median, r.low, r.high) == (2.9, 2.0, 3.4)
    d = r.as_dict()
    assert d["rounds"] == 5 and d["min"] == 2.0 and d["max"] == 3.4
    assert ratio_text(d) == "2.9x faster (2.0-3.4x over 5 interleaved rounds)"
    assert ratio_text(None) == "faster: not measured"
    slower = ratio_spread([1.0, 1.0], [20.0, 10.0]).as_dict()  # a slower student keeps its digits
    assert ratio_text(slower, "") == "0.07x (0.05-0.10x over 2 interleaved rounds)"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0, None])
def test_a_ratio_with_a_bad_round_is_no_claim(bad):
    assert ratio_spread([2.0, 2.0], [1.0, bad]) is None
    assert ratio_spread([bad, 2.0], [1.0, 1.0]) is None


def test_rounds_that_do_not_pair_up_are_no_claim():
    assert ratio_spread([2.0, 2.0], [1.0]) is None and ratio_spread([], []) is None


def test_interleave_takes_turns_within_every_round_and_keeps_each_rounds_p50():
    order = []

    def block(name, times):
        def run():
            order.append(name)
            return times
        return run
    p50s = interleave({"teacher": block("teacher", [3.0, 1.0, 2.0]), "student": block("student", [1.0, 5.0, 0.5])},
                      rounds=3)
    assert order == ["teacher", "student"] * 3
    assert p50s == {"teacher": [2.0, 2.0, 2.0], "student": [1.0, 1.0, 1.0]}
    with pytest.raises(ValueError):
        interleave({"x": block("x", [1.0])}, rounds=0)


# ------------------------------------------------------------------------------------------------ load
def test_a_busy_machine_warns_and_a_quiet_one_does_not(monkeypatch):
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (6.1, 3.0, 2.0))
    assert load_average() == 6.1
    busy = busy_by_others(load_average(), 5.8, cpus=2, own=2)  # ~4 runnable tasks of another job on 2 cores
    assert busy["busy"] is True and busy["others_per_cpu"] == 2.05
    assert "busy" in busy["warning"] and "\n" not in busy["warning"]
    quiet = busy_by_others(2.1, 1.9, cpus=2, own=2)  # only our own two timed threads
    assert quiet["busy"] is False and quiet["warning"] is None and quiet["others_per_cpu"] == 0.05
    edge = busy_by_others(3.0, 3.0, cpus=2, own=2)  # half the cores busy with other work: still quiet enough
    assert edge["others_per_cpu"] == 0.5 and edge["busy"] is False
    assert set(busy) == {"load1_before", "load1_after", "cpus", "own_threads", "others_per_cpu", "busy", "warning"}


@pytest.mark.parametrize("bad", [None, float("nan")])
def test_an_unknown_load_fails_closed(bad):
    record = busy_by_others(bad, 1.0, cpus=2, own=1)
    assert record["busy"] is True and "could not be read" in record["warning"]


def test_no_load_average_on_this_os_is_none(monkeypatch):
    def missing():
        raise OSError("no load average")
    monkeypatch.setattr(timing.os, "getloadavg", missing)
    assert load_average() is None


# ------------------------------------------------------------------------------------------------ sizes
ARTIFACTS = [
    {"name": "image_fp32_onnx", "encoder": "image", "format": "onnx", "precision": "fp32", "size_mb": 2.7},
    {"name": "image_int8_onnx", "encoder": "image", "format": "onnx", "precision": "int8", "size_mb": 0.9},
    {"name": "text_fp32_onnx", "encoder": "text", "format": "onnx", "precision": "fp32", "size_mb": 25.7},
]


def test_the_footprint_counts_both_towers_and_the_tokenizer():
    foot = rep.footprint(ARTIFACTS, tokenizer_mb=1.6, text_is_teacher=True, teacher_image_mb=3.8)
    fp32 = foot["students"]["image_fp32_onnx"]
    assert [p["part"] for p in fp32["parts"]] == ["image encoder", "text encoder", "tokenizer files"]
    assert fp32["total_mb"] == pytest.approx(30.0)
    assert foot["students"]["image_int8_onnx"]["total_mb"] == pytest.approx(28.2)  # int8 image + the fp32 text
    assert foot["teacher"]["total_mb"] == pytest.approx(31.1)  # the shared text tower counts on both sides
    size = rep.size_ratio(foot["teacher"], fp32)
    assert size["total_ratio"] == pytest.approx(1.04) and size["image_ratio"] == pytest.approx(1.41)


def test_a_footprint_with_a_part_unknown_has_no_total_and_no_ratio():
    foot = rep.footprint(ARTIFACTS, tokenizer_mb=None, text_is_teacher=True, teacher_image_mb=3.8)
    assert foot["students"]["image_fp32_onnx"]["total_mb"] is None
    assert rep.size_ratio(foot["teacher"], foot["students"]["image_fp32_onnx"])["total_ratio"] is None
    own_text = rep.footprint(ARTIFACTS, tokenizer_mb=1.6, text_is_teacher=False, teacher_image_mb=3.8)
    assert own_text["teacher"] is None and "text tower of its own" in own_text["teacher_note"]
    untimed = rep.footprint(ARTIFACTS, tokenizer_mb=1.6, text_is_teacher=True, teacher_image_mb=None)
    assert untimed["teacher"] is None and "--teacher" in untimed["teacher_note"]
    image_only = rep.footprint(ARTIFACTS[:1], tokenizer_mb=None, text_is_teacher=True, teacher_image_mb=3.8)
    assert image_only["students"]["image_fp32_onnx"]["total_mb"] == 2.7 and image_only["teacher"]["total_mb"] == 3.8


def _bench(latency=(2.3, 2.9, 3.4), text_is_teacher=True):
    foot = rep.footprint(ARTIFACTS, 1.6, text_is_teacher, 3.8)
    low, median, high = latency
    ratio = {"median": median, "min": low, "max": high, "rounds": 5, "per_round": []}
    return {"footprint": foot, "timing_load": {"warning": None},
            "versus_teacher": [{"student": "image_fp32_onnx", "teacher": "teacher_image_fp32_onnx",
                                "backend": "onnxruntime-cpu", "batch": 1, "latency_ratio": ratio}]}


def test_the_demo_claim_uses_totals_and_the_interleaved_spread():
    c = demo.compression(_bench())
    assert c["size_ratio"] == pytest.approx(1.04) and c["image_size_ratio"] == pytest.approx(1.41)
    assert c["smaller"] and c["faster"] and (c["latency_ratio_min"], c["latency_ratio_max"]) == (2.3, 3.4)
    line = demo._compression_line({"compression": c})
    assert "1.04x smaller in total" in line and "image encoder alone 1.41x" in line
    assert "2.9x faster (2.3-3.4x over 5 interleaved rounds)" in line
    # faster only when every round says so; not smaller when the totals are not
    slower_once = demo.compression(_bench((0.9, 1.3, 1.6)))
    assert slower_once["faster"] is False
    assert "(so it is not faster in every round)." in demo._compression_line({"compression": slower_once})
    assert demo.compression(_bench(text_is_teacher=False))["smaller"] is False
    assert demo._compression_line({"compression": demo.compression({})}).startswith("Compression: not measured")


def test_a_busy_timing_is_said_with_the_claim():
    report = {"compression": demo.compression(_bench()), "timing_load": {"warning": "the machine was busy"}}
    assert "Timed on a busy machine: the machine was busy" in demo._compression_line(report)


# ------------------------------------------------------------------------------------------------ tables
def _console(width=80):
    return Console(file=io.StringIO(), width=width, record=True, markup=False, force_terminal=True)


def _lines(console):
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= console.width
    return text


def _row(artifact, backend, batch, p50, **more):
    row = rep.make_row(artifact=artifact, role="teacher" if artifact.startswith("teacher") else "student",
                       encoder="image", format="onnx", precision="fp32", backend=backend, batch=batch, p50_ms=p50,
                       p99_ms=p50 and p50 * 1.5, throughput_ips=123.4, size_mb=25.735, i2t_r1=42.2, rsum=421.0,
                       status="ok")
    row.update(more)
    return row


BENCH = {"device_line": "cpu: AMD EPYC, 2 threads", "versus_teacher": [], "rows": [
    _row("teacher_image_fp32_onnx", "onnxruntime-cpu", 1, 2.8847),
    _row("image_fp32_onnx", "onnxruntime-cpu", 1, 1.0052),
    _row("image_fp32_onnx", "openvino-cpu", 1, None, status="skipped",
         reason="openvino is not installed (pip install 'edgedistill[openvino]')"),
    _row("text_fp32_pytorch", "pytorch-cpu", 32, 123.4567)]}


def test_the_bench_table_fits_80_columns_with_every_number_whole():
    console = _console()
    rep.print_table({**BENCH, "versus_teacher": _bench()["versus_teacher"]}, console)
    text = _lines(console)
    for number in ("2.885", "1.005", "123.457", "25.73", "42.2"):
        assert number in text
    assert "teacher_image_fp32_onnx" in text and "ort-cpu" in text
    flowing = " ".join(text.split())  # lines under the table wrap between words
    assert "openvino-cpu: openvino is not installed (pip install 'edgedistill[openvino]')" in flowing
    assert "2.9x faster (2.3-3.4x over 5 interleaved rounds)" in flowing


def test_the_wide_bench_table_has_every_column():
    console = _console(200)
    rep.print_table(BENCH, console)
    text = _lines(console)
    assert "onnxruntime-cpu" in text and "items/s" in text and "p99 ms" in text and "185.185" in text


def test_the_demo_table_fits_80_columns():
    bench = {**_bench(), "rows": [
        {**_row("teacher_image_fp32_onnx", "onnxruntime-cpu", 1, 2.8847), "size_mb": 3.8},
        {**_row("image_fp32_pytorch", "pytorch-cpu", 1, 12.3123), "format": "pytorch"},
        {**_row("image_fp32_onnx", "onnxruntime-cpu", 1, 1.0052), "size_mb": 2.7}]}
    summary = {k: {"i2t_r1": 39.6, "i2t_r5": 68.8, "i2t_r10": 81.6, "t2i_r1": 38.7, "rsum": 405.7}
               for k in ("teacher", "student")}
    rows = demo._rows(summary, bench)
    report = {"latency": {"backend": "onnxruntime CPU", "batch": 1, "threads": 2, "iterations": 50},
              "rows": rows, "compression": demo.compression(bench), "timing_load": {}}
    console = _console()
    demo.print_report(report, console)
    text = _lines(console)
    for number in ("31.1", "30.0", "2.88", "12.31", "405.7", "25.7", "1.6"):
        assert number in text
    assert "total" in text and "tokenizer files" in text
    assert "2.9x faster (2.3-3.4x over 5 interleaved rounds)" in text.replace("\n", " ")
    wide = _console(140)
    demo.print_report(report, wide)
    text = _lines(wide)
    assert "image MB" in text and "i2t R@10" in text


def test_the_distill_export_and_cache_tables_fit_80_columns(monkeypatch):
    console = _console()
    monkeypatch.setattr(cli, "make_console", lambda **kwargs: console)
    metrics = {"i2t_r1": 39.6, "t2i_r10": 94.2333, "rsum": 405.7, "agreement_top1": 36.25,
               "cosine_to_teacher": 0.99222, "zs_mean_class": 13.9237}
    cli._print_summary({"teacher": metrics, "student": metrics, "val_images": 1000, "steps": 1200,
                        "train_images_per_s": 211.46, "retention": {"rsum": 1.0378}}, Path("/tmp/run"))
    doc = {"val": {"images": 1000}, "artifacts": [
        {"path": "image_fp32.onnx", "format": "onnx", "precision": "fp32", "size_mb": 2.694,
         "parity": {"cosine_mean": 0.99999}, "val": {"i2t_r1": 42.2, "t2i_r1": 43.0667, "rsum": 421.0333}},
        {"path": "text_fp16_orin_nano_jetpack6.engine", "format": "trt", "precision": "fp16", "size_mb": 13.1}]}
    console.print(cli._export_table(doc))
    cache = SimpleNamespace(n_images=20000, bad_images=[1, 2], n_texts=60000, path="/very/long/cache/path" * 4)
    console.print(cli._cache_table({"train": SimpleNamespace(cache=cache, hit=False, seconds=1234.5)}))
    text = _lines(console)
    for number in ("94.2", "0.992", "103.8%", "0.99999", "421.0", "13.1", "20000", "60000", "1234.5"):
        assert number in text


# ------------------------------------------------------------------------------------------------ plots
def _tick_labels(ax):
    lo, hi = ax.get_xlim()
    return [t.get_text() for t, x in zip(ax.get_xticklabels(), ax.get_xticks()) if lo <= x <= hi and t.get_text()]


@pytest.mark.parametrize("latencies", [(0.9, 1.0, 2.9, 5.2, 12.3), (0.95, 1.0, 1.1), (40.0, 44.0), (1.0,)])
def test_the_pareto_latency_axis_has_several_labelled_ticks(latencies):
    rows = [_row(f"{'teacher' if i == 0 else 'image'}_{i}", "onnxruntime-cpu", 1, v, i2t_r1=40.0 + i)
            for i, v in enumerate(latencies)]
    fig, batch = rep.pareto_figure({"device_line": "cpu", "rows": rows})
    fig.canvas.draw()
    ax = fig.axes[0]
    assert batch == 1 and len(_tick_labels(ax)) >= 3, _tick_labels(ax)
    assert ax.get_xscale() == ("log" if max(latencies) / min(latencies) >= 10 else "linear")
    # every point is named once in the legend, and no label is written over the points
    assert len(ax.get_legend().get_texts()) == len(latencies) and not ax.texts
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_the_pareto_plot_is_a_png(tmp_path):
    assert rep.pareto_plot(BENCH, tmp_path / "p.png") == 1
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG


def test_the_search_sheet_wraps_whole_captions_and_labels_every_row(tmp_path):
    image = tmp_path / "a.jpg"
    Image.new("RGB", (64, 64), "red").save(image)
    caption = ("a small red hexagon in the center, a large red circle in the top left and a small red cross in the "
               "top right on a striped background")
    hits = [Hit(r, 0.9 - r / 100, str(image), caption, group=f"query {q!r}") for q in ("red", "blue")
            for r in range(1, 8)]
    rows = _grid(hits, 5)
    assert [len(r) for r in rows] == [5, 2, 5, 2] and rows[1][0].group == "query 'red'"
    label = _label(hits[0])
    assert label[0] == "#1  score 0.890" and " ".join(label[2:]) == caption  # nothing cut
    out = png_sheet(hits, "a title " * 40, tmp_path / "s.png")
    assert out.read_bytes()[:8] == PNG
    short = png_sheet([Hit(1, 0.5, str(image), "short", group="q")], "t", tmp_path / "t.png")
    assert Image.open(out).height > 4 * Image.open(short).height  # four labelled rows, long captions in full


def test_a_caption_past_the_line_limit_ends_with_dots():
    label = _label(Hit(1, 0.5, "x.jpg", "word " * 400))
    assert label[-1].endswith("...") and math.isclose(len(label), 2 + 12)


# ------------------------------------------------------------------------------------------------ --json/--csv
def test_json_and_csv_together_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["bench", str(tmp_path), "--json", "--csv"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and "--csv" in captured.err


def test_csv_rows_follow_the_row_fields():
    rows = rep.csv_rows({"rows": [_row("image_fp32_onnx", "onnxruntime-cpu", 1, 1.0, power={"rail": "VDD"})]})
    assert len(rows[0]) == len(rep.ROW_FIELDS)
    cells = dict(zip(rep.ROW_FIELDS, rows[0]))
    assert cells["p50_ms"] == 1.0 and cells["peak_mem_mb"] == "" and json.loads(cells["power"]) == {"rail": "VDD"}
