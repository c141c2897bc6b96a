"""The glibc allocator tuning for CPU training."""

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_stops_page_faults_on_reallocation():
    # Each child frees and re-allocates a 64 MB buffer 20 times; with the tuning the pages stay mapped.
    code = """
import resource, sys
import numpy as np
from edgedistill.distill.memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "on" else False
for _ in range(3):
    np.ones(16 << 20, dtype=np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    a = np.empty(16 << 20, dtype=np.float32); a.fill(1.0); del a
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    faults = {}
    for mode in ("on", "off"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
        applied, count = out.stdout.split()
        faults[mode] = int(count)
        assert applied == ("True" if mode == "on" else "False")
    assert faults["on"] * 10 < faults["off"], faults  # 20 x 16k pages faulted again without it


def test_tuning_can_be_switched_off(monkeypatch):
    import edgedistill.distill.memory as runtime
    monkeypatch.setattr(runtime, "_applied", False)
    monkeypatch.setenv("EDGEDISTILL_MALLOC_TUNING", "0")
    assert runtime.keep_freed_memory() is False
