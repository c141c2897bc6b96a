"""What edgedistill prints keeps its square brackets: paths, captions and fixes hold them, and rich markup would
drop them (``edgedistill[openvino]`` -> ``edgedistill``) or fail on them (``[/x]``)."""

import io

from rich.console import Console

from edgedistill.bench.report import print_table
from edgedistill.core.terminal import make_console, warn

BRACKETS = "pip install 'edgedistill[openvino]'; photos [2019]/a[/x].jpg"


def _row(**over):
    row = dict(artifact="image_fp32_onnx", backend="openvino-cpu", precision="fp32", batch=None, p50_ms=None,
               p99_ms=None, throughput_ips=None, size_mb=6.1, i2t_r1=None, rsum=None, zs_mean_class=None,
               energy_mj_per_item=None, status="skipped", reason=BRACKETS)
    row.update(over)
    return row


def test_a_console_prints_brackets_as_given():
    out = io.StringIO()
    console = make_console(file=out, width=300)
    console.print(BRACKETS)
    warn(console, BRACKETS)
    assert out.getvalue().splitlines() == [BRACKETS, "warning: " + BRACKETS]


def test_warn_keeps_brackets_on_a_console_with_markup_on():
    out = io.StringIO()
    warn(Console(file=out, width=300), BRACKETS)  # a caller's own console
    assert out.getvalue().strip() == "warning: " + BRACKETS


def test_the_bench_table_shows_a_skip_reason_with_its_install_extra():
    out = io.StringIO()
    print_table({"device_line": "cpu [test]", "rows": [_row(), _row(backend="onnxruntime-cpu", status="ok",
                                                                  reason=None, batch=1, p50_ms=0.5)]},
                make_console(file=out, width=400))
    text = out.getvalue()
    assert BRACKETS in text and "cpu [test]" in text
