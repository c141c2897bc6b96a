"""jetson.py against real device output (tests/fixtures/jetson/, copied from shared/fixtures/jetson/)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from edgedistill.runtime.jetson import (
    POWER_MIN_SAMPLES, SUM_OF_RAILS, PowerMode, TegraRelease, TegrastatsSampler, TimedSample, detect_jetson,
    measure_power, parse_nvpmodel, parse_tegra_release, parse_tegrastats, power_mode, power_summary, require_jetson,
)
from edgedistill.core.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures" / "jetson"


def device_lines(name: str) -> list[str]:
    """The device output of a fixture: every line but the first, which is a comment naming the source."""
    lines = (FIXTURES / name).read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#"), f"{name}: the first line should be the source comment"
    return [ln for ln in lines[1:] if ln.strip()]


def device_text(name: str) -> str:
    return "\n".join(device_lines(name)) + "\n"


TEGRASTATS_FILES = sorted(p.name for p in FIXTURES.glob("tegrastats_*.txt"))


def test_fixtures_are_all_there() -> None:
    assert TEGRASTATS_FILES == ["tegrastats_agx_orin.txt", "tegrastats_agx_xavier_jp4.txt",
                                "tegrastats_orin_nano_jp6.txt", "tegrastats_xavier_tx2_era.txt"]
    assert (FIXTURES / "nvpmodel_q_orin_nano_jp6.txt").is_file()
    assert (FIXTURES / "nv_tegra_release_r36.txt").is_file()


@pytest.mark.parametrize("name", TEGRASTATS_FILES)
def test_every_real_tegrastats_line_parses(name: str) -> None:
    lines = device_lines(name)
    assert lines
    for line in lines:
        s = parse_tegrastats(line)
        assert s.ram_used_mb is not None and 0 < s.ram_used_mb < s.ram_total_mb
        assert s.cpu_load and len(s.cpu_load) == len(s.cpu_mhz)
        assert s.gpu_load is not None
        assert s.rails and s.board_power_mw is not None and s.board_power_mw > 0
        assert s.temperatures


def test_orin_nano_jp6() -> None:
    (line,) = device_lines("tegrastats_orin_nano_jp6.txt")
    s = parse_tegrastats(line)
    assert s.timestamp == "07-14-2025 10:29:36"
    assert (s.ram_used_mb, s.ram_total_mb) == (2147, 7620)
    assert (s.swap_used_mb, s.swap_total_mb) == (1476, 3810)
    assert s.cpu_load == (0,) * 6 and s.cpu_mhz == (729,) * 6
    assert s.gpu_load == 0 and s.gpu_mhz is None  # "GR3D_FREQ 0%": no clock printed
    assert s.temperatures["cpu"] == pytest.approx(47.687)
    assert s.temperatures["tj"] == pytest.approx(48.625)
    assert s.rails == {"VDD_IN": (4556, 4556), "VDD_CPU_GPU_CV": (483, 483), "VDD_SOC": (1451, 1451)}
    assert s.board_rail == "VDD_IN" and s.board_power_mw == 4556 and not s.board_power_is_sum


def test_agx_orin() -> None:
    (line,) = device_lines("tegrastats_agx_orin.txt")
    s = parse_tegrastats(line)
    assert s.timestamp == "04-11-2025 10:36:27"
    assert (s.ram_used_mb, s.ram_total_mb) == (4321, 62801)
    assert len(s.cpu_load) == 12
    assert s.gpu_load == 0 and s.gpu_mhz == 0  # "GR3D_FREQ 0%@[0,0]"
    # no module input rail (VIN_SYS_5V0 is a 5 V sub-rail): jtop's rule sums every connected rail
    assert s.board_rail == SUM_OF_RAILS and s.board_power_is_sum
    assert s.board_power_mw == 2340 + 390 + 4025 + 301
    assert s.rails["VDD_GPU_SOC"] == (2340, 2340)
    assert s.rails["VDD_CPU_CV"] == (390, 390)
    assert s.rails["VDDQ_VDD2_1V8AO"] == (301, 301)
    assert s.rails["NC"] == (0, 0) and s.rails["NC#2"] == (0, 0)  # two unconnected channels, both kept
    # -256C means "sensor off": not a temperature
    assert "CV0" not in s.temperatures and "GPU" not in s.temperatures
    assert s.temperatures["CPU"] == pytest.approx(44.562) and s.temperatures["Tboard"] == 32
    # VIC_FREQ / APE are clocks, RAM/SWAP are memory: none of them is a rail
    assert not {"RAM", "SWAP", "VIC_FREQ", "APE"} & set(s.rails)


def test_tx2_era_rails_without_units() -> None:
    (line,) = device_lines("tegrastats_xavier_tx2_era.txt")
    s = parse_tegrastats(line)
    assert s.timestamp is None
    assert (s.ram_used_mb, s.ram_total_mb) == (2020, 7852)
    assert s.cpu_load == (9, 21, 25, 3, 1, 1) and s.cpu_mhz == (345,) * 6
    assert s.gpu_load == 0
    assert s.rails["VDD_IN"] == (3140, 3208)
    assert s.rails["VDD_SYS_GPU"] == (153, 158)
    assert s.rails["VDD_4V0_WIFI"] == (633, 527)
    assert len(s.rails) == 6
    assert s.board_rail == "VDD_IN" and s.board_power_mw == 3140
    assert s.temperatures["thermal"] == pytest.approx(41.9)


def test_agx_xavier_rails_without_the_vdd_prefix() -> None:
    (line,) = device_lines("tegrastats_agx_xavier_jp4.txt")
    s = parse_tegrastats(line)
    assert s.rails == {"GPU": (463, 463), "CPU": (618, 618), "SOC": (2936, 2936), "CV": (0, 0),
                       "VDDRQ": (309, 309), "SYS5V": (3306, 3306)}
    assert s.temperatures["GPU"] == pytest.approx(30.5) and len(s.cpu_load) == 8  # GPU@ and CPU [ are not rails
    assert s.board_rail == SUM_OF_RAILS and s.board_power_mw == 463 + 618 + 2936 + 0 + 309 + 3306


def test_gr3d_forms_and_offline_cores_and_sum_fallback() -> None:
    # the three GR3D_FREQ forms, on the Orin Nano line
    base = device_lines("tegrastats_orin_nano_jp6.txt")[0]
    assert parse_tegrastats(base.replace("GR3D_FREQ 0%", "GR3D_FREQ 37%@1020")).gpu_mhz == 1020
    s = parse_tegrastats(base.replace("GR3D_FREQ 0%", "GR3D_FREQ 99%@[918,1020]"))
    assert (s.gpu_load, s.gpu_mhz) == (99, 1020)
    # a core switched off by the power mode
    s = parse_tegrastats(base.replace("CPU [0%@729,0%@729,", "CPU [off,12%@1510,"))
    assert s.cpu_load[:2] == (None, 12) and s.cpu_mhz[:2] == (None, 1510)
    # without the module input rail: the sum of the rails, flagged
    s = parse_tegrastats(base.replace("VDD_IN 4556mW/4556mW ", ""))
    assert s.board_rail == SUM_OF_RAILS and s.board_power_is_sum
    assert s.board_power_mw == 483 + 1451


def test_not_a_tegrastats_line() -> None:
    with pytest.raises(ValueError):
        parse_tegrastats("tegrastats: command failed")
    with pytest.raises(ValueError):
        parse_tegrastats("")


def test_nvpmodel() -> None:
    assert parse_nvpmodel(device_text("nvpmodel_q_orin_nano_jp6.txt")) == PowerMode("MAXN_SUPER", 2)
    assert parse_nvpmodel("NVPM WARN: fan mode is not set!\nNV Fan Mode:quiet\nNV Power Mode: 15W\n0\n") \
        == PowerMode("15W", 0)
    with pytest.raises(ValueError):
        parse_nvpmodel("NVPM ERROR: failed to read PARAM")


def test_tegra_release() -> None:
    rel = parse_tegra_release(device_text("nv_tegra_release_r36.txt"))
    assert rel == TegraRelease(release="36", revision="4.3", board="generic")
    assert rel.l4t == "36.4.3"
    with pytest.raises(ValueError):
        parse_tegra_release("Debian GNU/Linux 12")


def _script(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


def test_power_mode_command(tmp_path: Path) -> None:
    ok = _script(tmp_path / "nvpmodel", "print('NV Power Mode: MAXN_SUPER')\nprint(2)\n")
    assert power_mode((str(ok), "-q")) == (PowerMode("MAXN_SUPER", 2), None)
    denied = _script(tmp_path / "nvpmodel_denied",
                     "import sys\nprint('NVPM ERROR: Permission denied, run as root', file=sys.stderr)\n"
                     "sys.exit(1)\n")
    mode, why = power_mode((str(denied), "-q"))
    assert mode is None and "needs root" in why and "Permission denied" in why
    mode, why = power_mode((str(tmp_path / "no-such-nvpmodel"), "-q"))
    assert mode is None and "not installed" in why


def _fake_root(tmp_path: Path, release: str | None, model: bytes | None, firmware_model: bytes | None = None) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    if release is not None:
        (root / "etc" / "nv_tegra_release").write_text(release)
    if model is not None:
        (root / "proc" / "device-tree").mkdir(parents=True)
        (root / "proc" / "device-tree" / "model").write_bytes(model)
    if firmware_model is not None:
        (root / "sys" / "firmware" / "devicetree" / "base").mkdir(parents=True)
        (root / "sys" / "firmware" / "devicetree" / "base" / "model").write_bytes(firmware_model)
    return root


ORIN_MODEL = b"NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super\0"


def test_detect_jetson(tmp_path: Path) -> None:
    root = _fake_root(tmp_path, device_text("nv_tegra_release_r36.txt"), ORIN_MODEL)
    info = detect_jetson(root)
    assert info is not None
    assert info.model == "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"  # NUL stripped
    assert info.l4t == "36.4.3" and info.release.board == "generic"
    assert "L4T 36.4.3" in info.describe()
    assert require_jetson(root) == info


def test_detect_jetson_firmware_model_fallback(tmp_path: Path) -> None:
    root = _fake_root(tmp_path, None, None, firmware_model=b"NVIDIA Jetson AGX Orin Developer Kit\0")
    info = detect_jetson(root)
    assert info is not None and info.model == "NVIDIA Jetson AGX Orin Developer Kit" and info.release is None


def test_not_a_jetson(tmp_path: Path) -> None:
    root = _fake_root(tmp_path, None, b"Raspberry Pi 5 Model B Rev 1.0\0")
    assert detect_jetson(root) is None
    with pytest.raises(UserError) as e:
        require_jetson(root)
    msg = str(e.value)
    assert "not a Jetson" in msg and "nv_tegra_release" in msg and "--host user@address" in msg
    assert "\n" not in msg


# ------------------------------------------------------------------------------------------ sampler


def _fake_tegrastats(tmp_path: Path, lines: list[str], period_s: float = 0.05) -> Path:
    """A tegrastats that checks its --interval and prints the given lines every 50 ms, forever."""
    return _script(tmp_path / "tegrastats", f"""\
import sys, time
assert sys.argv[1:] == ["--interval", "50"], sys.argv
lines = {lines!r}
i = 0
while True:
    print(lines[i % len(lines)], flush=True)
    i += 1
    time.sleep({period_s})
""")


def test_sampler_with_fake_tegrastats(tmp_path: Path) -> None:
    nano = device_lines("tegrastats_orin_nano_jp6.txt")[0]
    busy = nano.replace("VDD_IN 4556mW/4556mW", "VDD_IN 7444mW/6000mW")  # a second, known power level
    exe = _fake_tegrastats(tmp_path, [nano, busy])
    with TegrastatsSampler(interval_ms=50, command=(str(exe),)) as sampler:
        deadline = time.monotonic() + 10
        while len(sampler.samples) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc = sampler._proc
    assert proc is not None and proc.poll() is not None  # stopped on exit
    samples = sampler.samples
    assert len(samples) >= 6
    times = [s.time for s in samples]
    assert times == sorted(times)
    assert [s.sample.board_power_mw for s in samples[:4]] == [4556, 7444, 4556, 7444]
    n = len(samples)
    time.sleep(0.2)
    assert len(sampler.samples) == n  # nothing arrives after stop

    # a window holding exactly samples 1..4 (7444, 4556, 7444, 4556): average 6000 mW
    start = (samples[0].time + samples[1].time) / 2
    end = (samples[4].time + samples[5].time) / 2
    summary = power_summary(samples, start, end, images=8)
    assert summary["sample_count"] == 4
    assert summary["board_rail"] == "VDD_IN" and summary["board_power_is_sum"] is False
    assert summary["avg_board_power_w"] == pytest.approx(6.0)
    assert summary["energy_per_image_mj"] == pytest.approx(6000 * (end - start) / 8)
    assert summary["rails_avg_mw"]["VDD_SOC"] == pytest.approx(1451)
    assert summary["rails_avg_mw"]["VDD_IN"] == pytest.approx(6000)


def test_power_summary_arithmetic() -> None:
    base = device_lines("tegrastats_orin_nano_jp6.txt")[0]
    mk = lambda mw, t: TimedSample(t, parse_tegrastats(base.replace("4556mW/4556mW", f"{mw}mW/{mw}mW")))  # noqa: E731
    samples = [mk(1000, 0.5), mk(5000, 1.0), mk(6000, 2.0), mk(7000, 3.0), mk(9000, 3.5)]
    s = power_summary(samples, 1.0, 3.0, images=100)  # the window's edges count, 0.5 and 3.5 do not
    assert s["sample_count"] == 3
    assert s["avg_board_power_w"] == pytest.approx(6.0)          # (5000 + 6000 + 7000) / 3 mW
    assert s["energy_per_image_mj"] == pytest.approx(120.0)      # 6000 mW x 2 s / 100 images
    assert s["duration_s"] == 2.0 and s["images"] == 100
    assert s["rails_avg_mw"]["VDD_CPU_GPU_CV"] == pytest.approx(483)
    assert s["avg_gpu_load_pct"] == 0
    empty = power_summary(samples, 10.0, 11.0, images=1)
    assert empty["sample_count"] == 0 and empty["avg_board_power_w"] is None
    assert empty["energy_per_image_mj"] is None
    with pytest.raises(ValueError):
        power_summary(samples, 0, 1, images=0)


def test_measure_power_waits_for_enough_tegrastats_samples(tmp_path: Path) -> None:
    """However short each call, the power window holds POWER_MIN_SAMPLES samples (tegrastats prints every 50 ms)."""
    nano = device_lines("tegrastats_orin_nano_jp6.txt")[0]                 # VDD_IN 4556 mW
    exe = _fake_tegrastats(tmp_path, [nano])
    calls, syncs = [], []
    with TegrastatsSampler(interval_ms=50, command=(str(exe),)) as sampler:
        summary = measure_power(sampler, lambda: calls.append(1), items_per_call=8, sync=lambda: syncs.append(1))
    assert summary["sample_count"] >= POWER_MIN_SAMPLES
    assert summary["avg_board_power_w"] == pytest.approx(4.556)
    assert summary["images"] == 8 * len(calls) and len(syncs) == len(calls)  # every call counted and synced
    assert summary["energy_per_image_mj"] == pytest.approx(4556 * summary["duration_s"] / summary["images"])


def test_sampler_without_tegrastats(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        with TegrastatsSampler(command=(str(tmp_path / "tegrastats"),)):
            pass
    assert "not installed" in str(e.value) and "Jetson" in str(e.value)


@pytest.mark.slow
def test_sampler_kills_a_tegrastats_that_ignores_terminate(tmp_path: Path) -> None:
    exe = _script(tmp_path / "tegrastats", "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                           "print('RAM 1/2MB', flush=True)\ntime.sleep(60)\n")
    t0 = time.monotonic()
    with TegrastatsSampler(interval_ms=100, command=(str(exe),)) as sampler:
        while not sampler.samples and time.monotonic() - t0 < 10:
            time.sleep(0.02)
    assert time.monotonic() - t0 < 8
    assert [s.sample.ram_total_mb for s in sampler.samples] == [2]


@pytest.mark.skipif(not os.path.exists("/etc/nv_tegra_release"), reason="not on a Jetson")
def test_this_jetson() -> None:  # runs only on a real Jetson
    assert require_jetson().release is not None
