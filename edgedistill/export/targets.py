"""Deployment targets: one YAML preset per device (precision, batch profile, calibration, workspace).

A target names where an exported student will run and how it should be built there: the default export
format (``trt`` for NVIDIA GPUs, ``onnx`` for CPUs), the precision that lives in the graph
(docs/design.md#precision-in-the-onnx-graph), the TensorRT optimisation profile for the batch axis, the INT8
calibration set and the builder workspace.
Presets ship as package data in ``edgedistill/export/targets/``; a user's own YAML file works the same way.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from edgedistill.core.errors import UserError
from edgedistill.export.tensorrt import BatchProfile
from edgedistill.distill.recipe import describe_error, read_yaml



class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BatchRange(_Section):
    min: PositiveInt = Field(1, description="smallest batch the engine accepts")
    opt: PositiveInt = Field(1, description="batch TensorRT tunes its kernels for")
    max: PositiveInt = Field(1, description="largest batch the engine accepts")

    @model_validator(mode="after")
    def _ordered(self) -> "BatchRange":
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"needs min <= opt <= max (got min={self.min}, opt={self.opt}, max={self.max})")
        return self


class Calibration(_Section):
    size: PositiveInt = Field(512, description="images used to calibrate INT8 activations")
    method: Literal["entropy", "minmax", "percentile"] = Field("entropy", description="calibration method")


class Target(_Section):
    name: str = Field(description="target name (a preset's file name)")
    description: str = ""
    format: Literal["onnx", "trt"] = Field(description="default export format on this device")
    precision: Literal["fp32", "fp16", "int8"] = Field(description="precision written into the graph")
    batch: BatchRange = Field(description="TensorRT optimisation profile of the batch axis {min, opt, max}")
    calibration: Calibration = Calibration()
    workspace_mb: PositiveInt = Field(1024, description="TensorRT builder workspace in MiB")
    threads: PositiveInt | None = Field(None, description="CPU inference threads; null = onnxruntime's default")

    def batch_profile(self) -> "BatchProfile":
        return BatchProfile(min=self.batch.min, opt=self.batch.opt, max=self.batch.max)


# ------------------------------------------------------------------------------------------------ presets


def _preset_dir() -> Any:
    # importlib.resources works from a wheel, an editable install and a source checkout alike
    return resources.files("edgedistill.export").joinpath("targets")


def list_targets() -> list[str]:
    """Names of the preset targets, sorted."""
    return sorted(p.name.removesuffix(".yaml") for p in _preset_dir().iterdir() if p.name.endswith(".yaml"))


# ----------------------------------------------------------------------------------------------- validation


def validate_target(raw: Any, source: str = "target") -> Target:
    """A raw mapping validated into a Target, or a one-line UserError naming the first bad key."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a target is a YAML mapping (name, format, precision, batch, ...), "
                        f"not a {type(raw).__name__}")
    try:
        return Target.model_validate(raw)
    except ValidationError as e:
        errors = e.errors()
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise UserError(f"{source}: {describe_error(errors[0], Target)}{more}") from e


def _looks_like_path(text: str) -> bool:
    return text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text or Path(text).is_file()


def load_target(name_or_path: str | Path) -> Target:
    """A preset by name (``jetson-orin-nano``) or a user's target YAML file by path.

    Raises a one-line UserError for an unknown name (with the nearest preset), a missing or unreadable
    file, invalid YAML, or a bad key or value.
    """
    text = str(name_or_path)
    presets = list_targets()
    if text in presets:
        resource = _preset_dir().joinpath(f"{text}.yaml")
        with resources.as_file(resource) as path:
            raw = read_yaml(Path(path), what="target preset")
        return validate_target(raw, source=f"target preset '{text}'")
    if not isinstance(name_or_path, Path) and not _looks_like_path(text):
        close = difflib.get_close_matches(text, presets, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"unknown target '{text}'; {hint}presets: {', '.join(presets)} "
                        f"(or give the path of a target YAML file)")
    path = Path(text)
    raw = read_yaml(path, what="target")
    if raw is None:
        raise UserError(f"target {path} is empty; see edgedistill/export/targets/x86-cuda.yaml for an example")
    if isinstance(raw, dict):
        raw.setdefault("name", path.stem)   # a user file is named after itself unless it says otherwise
    return validate_target(raw, source=f"target {path}")
