"""The consoles edgedistill prints with.

Markup is off: what is printed holds paths, captions, labels and error messages with square brackets
(``pip install 'edgedistill[cpu]'``, ``photos [2019]/``), which rich would take as style tags and drop, or fail
on (``[/x]`` raises). Colour is given with ``style=`` instead.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console


def make_console(**kwargs: Any) -> Console:
    """``rich.console.Console(**kwargs)`` that prints text as given (no markup)."""
    return Console(markup=False, **kwargs)


def warn(console: Console, message: str) -> None:
    """``warning: message`` in yellow, printed as given whatever the console's markup setting."""
    console.print(f"warning: {message}", style="yellow", highlight=False, markup=False)
