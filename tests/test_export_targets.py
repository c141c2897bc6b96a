"""Deployment targets: every preset validates; user YAML files load; every mistake is one line naming the key."""

from pathlib import Path

import pytest
import yaml

from edgedistill.core.errors import UserError
from edgedistill.export.targets import Target, list_targets, load_target

PRESETS = ["cpu", "jetson-agx-orin", "jetson-orin-nano", "x86-cuda"]

GOOD = {
    "name": "my-box",
    "format": "trt",
    "precision": "fp16",
    "batch": {"min": 1, "opt": 4, "max": 16},
    "calibration": {"size": 256, "method": "percentile"},
    "workspace_mb": 2048,
}


def write(tmp_path: Path, raw, name: str = "target.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def test_presets_are_listed():
    assert list_targets() == PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_is_sane(name):
    target = load_target(name)
    assert isinstance(target, Target)
    assert target.name == name
    assert target.description
    assert 1 <= target.batch.min <= target.batch.opt <= target.batch.max
    assert target.workspace_mb >= 256
    assert target.calibration.size >= 1
    profile = target.batch_profile()
    assert (profile.min, profile.opt, profile.max) == (target.batch.min, target.batch.opt, target.batch.max)


def test_preset_values():
    nano, agx, x86, cpu = (load_target(n) for n in ("jetson-orin-nano", "jetson-agx-orin", "x86-cuda", "cpu"))
    assert (nano.format, nano.precision, nano.workspace_mb) == ("trt", "int8", 1024)
    assert (nano.batch.min, nano.batch.opt, nano.batch.max) == (1, 1, 8)
    assert (nano.calibration.size, nano.calibration.method) == (512, "entropy")
    assert (agx.precision, agx.workspace_mb, agx.batch.opt, agx.batch.max) == ("int8", 4096, 8, 32)
    assert (x86.precision, x86.workspace_mb, x86.batch.opt, x86.batch.max) == ("fp16", 8192, 32, 128)
    assert (cpu.format, cpu.precision, cpu.batch.max) == ("onnx", "int8", 32)


def test_user_yaml_by_path(tmp_path):
    target = load_target(str(write(tmp_path, GOOD)))
    assert target.name == "my-box" and target.batch.opt == 4 and target.calibration.method == "percentile"
    assert load_target(write(tmp_path, GOOD)) == target  # a Path works as well as a str


def test_user_yaml_defaults_name_and_optional_sections(tmp_path):
    raw = {k: v for k, v in GOOD.items() if k not in ("name", "calibration", "workspace_mb")}
    target = load_target(str(write(tmp_path, raw, "orin-lab.yml")))
    assert target.name == "orin-lab"
    assert (target.calibration.size, target.calibration.method, target.workspace_mb) == (512, "entropy", 1024)


def test_unknown_name_suggests_the_nearest_preset():
    with pytest.raises(UserError) as e:
        load_target("jetson-orin-nan")
    msg = str(e.value)
    assert "unknown target 'jetson-orin-nan'" in msg and "did you mean 'jetson-orin-nano'" in msg
    assert all(p in msg for p in PRESETS) and "\n" not in msg


def test_unknown_name_without_close_match_lists_presets():
    with pytest.raises(UserError, match="presets: cpu, jetson-agx-orin"):
        load_target("raspberry")


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_target(str(tmp_path / "nope.yaml"))


def test_invalid_yaml(tmp_path):
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_target(str(write(tmp_path, "name: x\nbatch: {min: 1, opt: [\n")))


def test_executable_yaml_tags_are_refused(tmp_path):
    with pytest.raises(UserError, match="not valid YAML"):
        load_target(str(write(tmp_path, "name: !!python/object/apply:os.system ['true']\n")))


def test_empty_and_non_mapping(tmp_path):
    with pytest.raises(UserError, match="is empty"):
        load_target(str(write(tmp_path, "", "empty.yaml")))
    with pytest.raises(UserError, match="a target is a YAML mapping"):
        load_target(str(write(tmp_path, "- 1\n- 2\n", "list.yaml")))


@pytest.mark.parametrize("change, expected", [
    ({"workspace": 10}, "unknown key 'workspace'; did you mean 'workspace_mb'?"),
    ({"batch": {"min": 1, "opt": 1, "mx": 4}}, "unknown key 'batch.mx'; did you mean 'batch.max'?"),
    ({"calibration": {"method": "kl"}}, "'calibration.method'"),
    ({"precision": "int4"}, "'precision'"),
    ({"format": "engine"}, "'format'"),
    ({"batch": {"min": 0, "opt": 1, "max": 4}}, "'batch.min'"),
    ({"workspace_mb": -1}, "'workspace_mb'"),
    ({"threads": 0}, "'threads'"),
])
def test_bad_keys_and_values_name_the_key(tmp_path, change, expected):
    with pytest.raises(UserError) as e:
        load_target(str(write(tmp_path, {**GOOD, **change})))
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_missing_required_key(tmp_path):
    raw = {k: v for k, v in GOOD.items() if k != "precision"}
    with pytest.raises(UserError, match="missing required key 'precision'"):
        load_target(str(write(tmp_path, raw)))


@pytest.mark.parametrize("batch", [{"min": 4, "opt": 2, "max": 8}, {"min": 1, "opt": 16, "max": 8}])
def test_batch_must_be_ordered(tmp_path, batch):
    with pytest.raises(UserError, match=r"'batch': needs min <= opt <= max"):
        load_target(str(write(tmp_path, {**GOOD, "batch": batch})))
