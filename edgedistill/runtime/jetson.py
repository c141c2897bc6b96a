"""Jetson detection and power measurement: parse tegrastats, nvpmodel and /etc/nv_tegra_release; sample power.

The formats differ between generations (see tests/fixtures/jetson/, real output of Orin Nano, AGX Orin and
TX2-era boards): Orin prints rails as ``VDD_IN 4556mW/4556mW`` (current/average), TX2/Xavier-era L4T as
``VDD_IN 3140/3208`` without a unit (milliwatts); ``GR3D_FREQ`` is ``N%``, ``N%@MHz`` or ``N%@[MHz,MHz]``.
``TegraSample.board_power_mw`` follows jtop's rule (jetson_stats, jtop/core/power.py): the module input rail
(``VDD_IN``, or ``POM_5V_IN`` on the original Nano) when the board prints one, else the sum of every connected
rail; AGX Orin (``VIN_SYS_5V0`` is a 5 V sub-rail, not the input) and AGX Xavier (``GPU``, ``CPU``, ``SOC``,
``SYS5V`` without a ``VDD_`` prefix) print no input rail.

Nothing here needs a Jetson to import or test: the filesystem root and the commands are parameters.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from edgedistill.core.errors import UserError

# The module input rail (jtop's rule): Orin Nano/NX, Xavier NX and TX2-era print VDD_IN, the original Nano
# POM_5V_IN. Without one (AGX Orin, AGX Xavier) every connected rail is summed, as jtop does.
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
SUM_OF_RAILS = "sum of rails"
POWER_MIN_SAMPLES = 5  # tegrastats samples a power window must hold (its interval is 100 ms by default)

# tegrastats prints -256C for a sensor that is powered off (AGX Orin: CV0@-256C GPU@-256C at idle)
_SENSOR_OFF_C = -256.0

_TIMESTAMP = re.compile(r"^\s*(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s+")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+(?:\.\d+)?)%(?:@(?:\[([\d,\s]*)\]|(\d+)))?")
_TEMP = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C(?=\s|$)")
# A rail is NAME CUR/AVG with both in mW or both unit-less; RAM/SWAP (MB) and IRAM (kB) never match.
_RAIL = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_]*) (\d+)(mW)?/(\d+)(mW)?(?=\s|$)")


@dataclass(frozen=True)
class TegraSample:
    """One tegrastats line. Loads in %, memory in MB, clocks in MHz, temperatures in C, rails in mW."""
    timestamp: str | None = None               # "07-14-2025 10:29:36" when tegrastats printed one
    ram_used_mb: int | None = None
    ram_total_mb: int | None = None
    swap_used_mb: int | None = None
    swap_total_mb: int | None = None
    cpu_load: tuple[float | None, ...] = ()     # per core; None for a core that is off
    cpu_mhz: tuple[int | None, ...] = ()
    gpu_load: float | None = None
    gpu_mhz: int | None = None                  # the highest of the GPCs' clocks when several are printed
    temperatures: dict[str, float] = field(default_factory=dict)
    rails: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (current_mw, average_mw)

    @property
    def connected_rails(self) -> dict[str, tuple[int, int]]:
        """Every rail but the unconnected "NC" channels (AGX Orin prints two)."""
        return {name: v for name, v in self.rails.items() if name.split("#")[0] != "NC"}

    @property
    def board_rail(self) -> str | None:
        """Which rail ``board_power_mw`` reads: an INPUT_RAILS name, SUM_OF_RAILS, or None (no rail at all)."""
        for name in INPUT_RAILS:
            if name in self.rails:
                return name
        return SUM_OF_RAILS if self.connected_rails else None

    @property
    def board_power_is_sum(self) -> bool:
        """True when the board prints no input rail and the power is the sum of its rails."""
        return self.board_rail == SUM_OF_RAILS

    @property
    def board_power_mw(self) -> int | None:
        """Current total board power in mW (see ``board_rail`` for where it comes from), None without rails."""
        rail = self.board_rail
        if rail is None:
            return None
        if rail == SUM_OF_RAILS:
            return sum(cur for cur, _ in self.connected_rails.values())
        return self.rails[rail][0]


def _number(text: str) -> float:
    value = float(text)
    return int(value) if value.is_integer() else value


def _parse_cpu(body: str) -> tuple[tuple[float | None, ...], tuple[int | None, ...]]:
    loads: list[float | None] = []
    clocks: list[int | None] = []
    for core in (c.strip() for c in body.split(",")):
        m = re.fullmatch(r"(\d+(?:\.\d+)?)%(?:@(\d+))?", core)
        if m:
            loads.append(_number(m.group(1)))
            clocks.append(int(m.group(2)) if m.group(2) else None)
        else:  # "off": a core taken offline by the power mode
            loads.append(None)
            clocks.append(None)
    return tuple(loads), tuple(clocks)


def parse_tegrastats(line: str) -> TegraSample:
    """Parse one tegrastats line (with or without a leading timestamp). ValueError when nothing is recognised."""
    text = line.strip()
    ts = _TIMESTAMP.match(text)
    values: dict[str, Any] = {"timestamp": ts.group(1) if ts else None}
    if m := _RAM.search(text):
        values["ram_used_mb"], values["ram_total_mb"] = int(m.group(1)), int(m.group(2))
    if m := _SWAP.search(text):
        values["swap_used_mb"], values["swap_total_mb"] = int(m.group(1)), int(m.group(2))
    if m := _CPU.search(text):
        values["cpu_load"], values["cpu_mhz"] = _parse_cpu(m.group(1))
    if m := _GR3D.search(text):
        values["gpu_load"] = _number(m.group(1))
        clocks = [int(c) for c in (m.group(2) or m.group(3) or "").replace(",", " ").split()]
        values["gpu_mhz"] = max(clocks) if clocks else None
    values["temperatures"] = {name: _number(t) for name, t in _TEMP.findall(text)
                              if float(t) != _SENSOR_OFF_C}
    rails: dict[str, tuple[int, int]] = {}
    for name, cur, unit_cur, avg, unit_avg in _RAIL.findall(text):
        if unit_cur != unit_avg:
            continue
        key, n = name, 2
        while key in rails:  # AGX Orin prints two unconnected "NC" channels: keep both, apart
            key, n = f"{name}#{n}", n + 1
        rails[key] = (int(cur), int(avg))
    values["rails"] = rails
    sample = TegraSample(**values)
    if sample.ram_total_mb is None and not rails and sample.gpu_load is None and not sample.cpu_load:
        raise ValueError(f"not a tegrastats line: {text[:80]!r}")
    return sample


# ------------------------------------------------------------------------------------------ nvpmodel


@dataclass(frozen=True)
class PowerMode:
    """The nvpmodel power mode: its name ("MAXN_SUPER", "15W") and id (2)."""
    name: str
    id: int | None


def parse_nvpmodel(text: str) -> PowerMode:
    """Parse ``nvpmodel -q`` output ("NV Power Mode: MAXN_SUPER\\n2"). ValueError without a mode line."""
    lines = [ln.strip() for ln in text.splitlines()]
    for i, ln in enumerate(lines):
        m = re.match(r"NV Power Mode\s*:\s*(\S.*)$", ln)
        if m:
            mode_id = next((int(x) for x in lines[i + 1:] if re.fullmatch(r"\d+", x)), None)
            return PowerMode(name=m.group(1).strip(), id=mode_id)
    raise ValueError(f"no 'NV Power Mode:' line in nvpmodel output: {text.strip()[:80]!r}")


def power_mode(command: Sequence[str] = ("nvpmodel", "-q"),
               timeout_s: float = 10) -> tuple[PowerMode | None, str | None]:
    """The current power mode and None, or None and the reason it cannot be read (recorded in the report)."""
    try:
        proc = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        return None, f"{command[0]} is not installed"
    except PermissionError:
        return None, f"{command[0]} is not executable by this user"
    except subprocess.TimeoutExpired:
        return None, f"`{' '.join(command)}` did not answer within {timeout_s:g} s"
    output = (proc.stdout or "") + "\n" + (proc.stderr or "")
    try:
        mode = parse_nvpmodel(proc.stdout or "")
    except ValueError:
        mode = None
    if mode is not None:
        return mode, None
    last = next((ln.strip() for ln in reversed(output.splitlines()) if ln.strip()), "no output")
    if re.search(r"permission|root|sudo|not permitted", output, re.IGNORECASE):
        return None, f"`{' '.join(command)}` needs root here (run bench with sudo to record it): {last}"
    return None, f"`{' '.join(command)}` exited with status {proc.returncode}: {last}"


# ------------------------------------------------------------------------------------------ L4T release


@dataclass(frozen=True)
class TegraRelease:
    """/etc/nv_tegra_release: release "36", revision "4.3" -> L4T "36.4.3", board "generic"."""
    release: str
    revision: str
    board: str | None = None

    @property
    def l4t(self) -> str:
        return f"{self.release}.{self.revision}"


def parse_tegra_release(text: str) -> TegraRelease:
    """Parse "# R36 (release), REVISION: 4.3, GCID: ..., BOARD: generic, ..." (ValueError otherwise)."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)", text)
    if not m:
        raise ValueError(f"not an nv_tegra_release line: {text.strip()[:80]!r}")
    board = re.search(r"BOARD:\s*([^,\s]+)", text[m.start():])
    return TegraRelease(release=m.group(1), revision=m.group(2), board=board.group(1) if board else None)


# ------------------------------------------------------------------------------------------ detection


@dataclass(frozen=True)
class JetsonInfo:
    """What identifies the Jetson: the device-tree model and the L4T release (either may be unknown)."""
    model: str | None
    release: TegraRelease | None

    @property
    def l4t(self) -> str | None:
        return self.release.l4t if self.release else None

    def describe(self) -> str:
        return f"{self.model or 'Jetson (unknown model)'}, L4T {self.l4t or 'unknown'}"


RELEASE_FILE = Path("etc/nv_tegra_release")
MODEL_FILES = (Path("proc/device-tree/model"), Path("sys/firmware/devicetree/base/model"))


def _read_model(root: Path) -> str | None:
    for rel in MODEL_FILES:
        try:
            raw = (root / rel).read_bytes()
        except OSError:
            continue
        model = raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip()  # device-tree strings end in NUL
        if model:
            return model
    return None


def detect_jetson(root: Path = Path("/")) -> JetsonInfo | None:
    """The Jetson this is, or None. A Jetson has /etc/nv_tegra_release, or a device-tree model naming Jetson."""
    root = Path(root)
    model = _read_model(root)
    try:
        text = (root / RELEASE_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = None
    if text is None and not (model and "jetson" in model.lower()):
        return None
    try:
        release = parse_tegra_release(text) if text is not None else None
    except ValueError:
        release = None
    return JetsonInfo(model=model, release=release)


def require_jetson(root: Path = Path("/")) -> JetsonInfo:
    """The Jetson this is, or a one-line UserError saying to run on the Jetson or use --host."""
    info = detect_jetson(root)
    if info is None:
        shown = "/" + str(RELEASE_FILE) if Path(root) == Path("/") else str(Path(root) / RELEASE_FILE)
        raise UserError(f"this machine is not a Jetson (no {shown}); "
                        f"run bench on the Jetson or pass --host user@address")
    return info


# ------------------------------------------------------------------------------------------ sampling


@dataclass(frozen=True)
class TimedSample:
    """A tegrastats sample and the time.monotonic() at which its line was read."""
    time: float
    sample: TegraSample


class TegrastatsSampler:
    """Run ``tegrastats --interval N`` in the background and keep every parsed line with its monotonic time.

    with TegrastatsSampler(100) as s:
        t0 = time.monotonic(); run(); t1 = time.monotonic()
    power_summary(s.samples, t0, t1, images)
    """

    def __init__(self, interval_ms: int = 100, command: Sequence[str] = ("tegrastats",)) -> None:
        if interval_ms < 1:
            raise UserError(f"tegrastats interval must be at least 1 ms (got {interval_ms})")
        self.interval_ms = int(interval_ms)
        self.command = [*command, "--interval", str(self.interval_ms)]
        self._samples: list[TimedSample] = []
        self._unparsed: list[str] = []
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> TegrastatsSampler:
        try:
            # stderr joins stdout: a separate pipe nobody reads could fill up and stall tegrastats
            self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, text=True, bufsize=1)
        except FileNotFoundError:
            raise UserError(f"power measurement needs `{self.command[0]}`, which is not installed here: "
                            f"run bench on a Jetson (tegrastats ships with L4T), or bench without power") from None
        except PermissionError:
            raise UserError(f"`{self.command[0]}` is not executable by this user: run bench with sudo, "
                            f"or bench without power") from None
        self._thread = threading.Thread(target=self._read, name="tegrastats", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            now = time.monotonic()
            if not line.strip():
                continue
            try:
                sample = parse_tegrastats(line)
            except ValueError:
                with self._lock:
                    self._unparsed.append(line.strip())
                continue
            with self._lock:
                self._samples.append(TimedSample(now, sample))

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop tegrastats (terminate, then kill) and wait for the reader to drain."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if proc.stdout is not None:
            proc.stdout.close()
        self._proc = None

    @property
    def samples(self) -> list[TimedSample]:
        with self._lock:
            return list(self._samples)

    @property
    def unparsed(self) -> list[str]:
        """Lines tegrastats printed that were not samples (its error messages, for instance)."""
        with self._lock:
            return list(self._unparsed)

    def summary(self, start: float, end: float, images: int) -> dict[str, Any]:
        return power_summary(self.samples, start, end, images)


def samples_between(samples: Sequence[TimedSample], start: float, end: float) -> int:
    return sum(1 for s in samples if start <= s.time <= end)


def measure_power(sampler: TegrastatsSampler, call: Callable[[], Any], items_per_call: int,
                  sync: Callable[[], None] = lambda: None, min_samples: int = POWER_MIN_SAMPLES,
                  max_seconds: float = 60.0) -> dict[str, Any]:
    """Run ``call`` back to back until the window holds ``min_samples`` tegrastats samples; its power summary.

    A latency run can be shorter than tegrastats' interval and catch no sample at all, so power gets its own
    window: at least ``min_samples`` intervals long, ``sync`` (CUDA) after each call so the window holds the
    work it counts. Stops after ``max_seconds`` whatever it holds (tegrastats may have died).
    """
    min_seconds = min_samples * sampler.interval_ms / 1000.0
    start = time.monotonic()
    calls = 0
    while True:
        call()
        sync()
        calls += 1
        now = time.monotonic()
        if now - start >= max_seconds:
            break
        if now - start >= min_seconds and samples_between(sampler.samples, start, now) >= min_samples:
            break
    return power_summary(sampler.samples, start, time.monotonic(), items_per_call * calls)


def power_summary(samples: Sequence[TimedSample], start: float, end: float, images: int) -> dict[str, Any]:
    """Average power over the monotonic window [start, end] and the energy per image it implies.

    Only samples read inside the window count. energy per image (mJ) = average board power (mW) x window (s)
    / images. Board power is None when no sample falls in the window or the board prints no rails.
    """
    if images < 1:
        raise ValueError(f"images must be at least 1 (got {images})")
    if end < start:
        raise ValueError(f"window ends before it starts ({start} > {end})")
    inside = [s.sample for s in samples if start <= s.time <= end]
    duration = end - start
    board = [p for p in (s.board_power_mw for s in inside) if p is not None]
    rails: dict[str, list[int]] = {}
    for s in inside:
        for name, (cur, _) in s.rails.items():
            rails.setdefault(name, []).append(cur)
    gpu = [s.gpu_load for s in inside if s.gpu_load is not None]
    avg_mw = sum(board) / len(board) if board else None
    return {
        "sample_count": len(inside),
        "duration_s": duration,
        "images": images,
        "board_rail": inside[0].board_rail if inside else None,
        "board_power_is_sum": bool(inside) and inside[0].board_power_is_sum,
        "avg_board_power_w": avg_mw / 1000 if avg_mw is not None else None,
        "energy_per_image_mj": avg_mw * duration / images if avg_mw is not None else None,
        "rails_avg_mw": {name: sum(v) / len(v) for name, v in rails.items()},
        "avg_gpu_load_pct": sum(gpu) / len(gpu) if gpu else None,
    }
