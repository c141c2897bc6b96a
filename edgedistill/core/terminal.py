"""The consoles edgedistill prints with.

Markup is off: what is printed holds paths, captions, labels and error messages with square brackets
(``pip install 'edgedistill[cpu]'``, ``photos [2019]/``), which rich would take as style tags and drop, or fail
on (``[/x]`` raises). Colour is given with ``style=`` instead.
"""

from __future__ import annotations

import re
from typing import Any

from rich.console import Console

# Characters a terminal acts on instead of showing: C0 and DEL (ESC starts OSC 52 clipboard writes, screen
# clears, retitles), C1 (U+0080-U+009F, the 8-bit CSI among them), the bidirectional overrides and isolates
# (U+202A-U+202E, U+2066-U+2069) that reorder what is shown, and lone surrogates (the bytes of a file name that is
# not valid UTF-8, as Python decodes it), which cannot be encoded for printing at all.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def make_console(**kwargs: Any) -> Console:
    """``rich.console.Console(**kwargs)`` that prints text as given (no markup)."""
    return Console(markup=False, **kwargs)


def safe(text: object) -> str:
    """``text`` (a path, caption, label or prompt from a file the user did not write) as one printable line:
    every control character as a visible escape (``\\x1b``, ``\\u202e``; a file name's undecodable byte as
    ``\\xNN``)."""
    def escape(m: re.Match[str]) -> str:
        c = ord(m.group())
        if 0xDC80 <= c <= 0xDCFF:  # surrogateescape: the original byte
            return f"\\x{c - 0xDC00:02x}"
        return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
    return _CONTROL.sub(escape, str(text))


def warn(console: Console, message: str) -> None:
    """``warning: message`` in yellow, printed as given whatever the console's markup setting."""
    console.print(f"warning: {safe(message)}", style="yellow", highlight=False, markup=False)
