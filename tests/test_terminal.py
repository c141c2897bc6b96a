"""What edgedistill prints keeps its square brackets: paths, captions and fixes hold them, and rich markup would
drop them (``edgedistill[openvino]`` -> ``edgedistill``) or fail on them (``[/x]``)."""

import io
import os

import pytest
from rich.console import Console

from edgedistill.bench.report import print_table
from edgedistill.core.terminal import make_console, safe, warn

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


# Every class of character a terminal acts on: C0 (ESC starts OSC 52 clipboard writes), DEL, C1 (0x9b is the 8-bit
# CSI), the bidirectional overrides and isolates, and a file name's byte that is not UTF-8.
CONTROLS = [chr(c) for c in range(0x20)] + ["\x7f"] + [chr(c) for c in range(0x80, 0xA0)] + \
    [chr(c) for c in range(0x202A, 0x202F)] + [chr(c) for c in range(0x2066, 0x206A)] + [os.fsdecode(b"\xff")]


@pytest.mark.parametrize("char", CONTROLS, ids=[f"U+{ord(c):04X}" for c in CONTROLS])
def test_safe_shows_every_control_character_as_a_visible_escape(char):
    text = safe(f"photo{char}]52;c;aGk=\x07.jpg")
    assert text.isprintable() and text.startswith("photo\\") and text.encode("ascii")
    out = io.StringIO()
    warn(make_console(file=out, width=300), f"skipped {char}")
    assert out.getvalue().isascii() and out.getvalue().rstrip("\n").isprintable()


def test_safe_leaves_printable_text_alone():
    for text in ("photos [2019]/a.jpg", "café 日本 ⌘", "a b\u00a0c"):
        assert safe(text) == text
