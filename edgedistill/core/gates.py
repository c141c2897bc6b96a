"""Thresholds that fail closed: a comparison with NaN is False in Python, so ``nan < floor`` would let a broken
value pass a gate written as ``if value < floor: fail``. Every gate in the project asks these instead.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def finite(value: Any) -> bool:
    """True for a real, finite number (False for NaN, +-inf, None, bools, strings: anything that is not one)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def at_least(value: Any, floor: float) -> bool:
    """``value >= floor`` for a finite value; False for NaN, inf and non-numbers (the gate fails)."""
    return finite(value) and float(value) >= floor


def at_most(value: Any, ceiling: float) -> bool:
    """``value <= ceiling`` for a finite value; False for NaN, inf and non-numbers (the gate fails)."""
    return finite(value) and float(value) <= ceiling
