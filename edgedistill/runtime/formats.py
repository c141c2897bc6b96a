"""One table of the artifact formats an export writes and the backends that run them.

The exporter reads ``FORMATS`` (what ``--format`` may ask for, what it needs installed, which function builds
it), bench reads ``BACKENDS`` (which runtime runs which format on which device, what it needs, which runner class
opens it), and so does the loader. Adding a backend is one entry in ``BACKENDS`` plus its runner class (a
``Runner`` subclass with ``open(path, artifact, options)``). The order of ``BACKENDS`` is the order of preference
when nothing else decides (fastest first on its device). This module imports no heavy library: the entries name
their functions as "module:attribute" strings, imported only when used.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

from edgedistill.runtime.cuda import cuda_python_missing

DEVICES = ("cpu", "cuda", "jetson")
PRECISIONS = ("fp32", "fp16", "int8")


def artifact_file(encoder: str, precision: str, fmt: str) -> str:
    """The file name of one tower's artifact: ``image_int8.onnx``, ``text_fp16.engine`` (the format's suffix)."""
    return f"{encoder}_{precision}{FORMATS[fmt].suffix}"


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str                      # file name ending of the artifact
    precisions: tuple[str, ...]      # the precisions it can hold
    description: str
    requires: str | None = None      # "module:function" raising UserError when the machine cannot build it
    build: str | None = None         # "module:function(job, graphs) -> artifact entries", after the ONNX graphs
    tokenizer: str | None = None     # "module:function(folder) -> tokenizer", for a format that carries no saved one


@dataclass(frozen=True)
class Backend:
    name: str
    formats: tuple[str, ...]         # artifact formats it runs
    devices: tuple[str, ...]         # bench devices it runs on
    runner: str                      # "module:Class" with ``open(path, artifact, options)``
    missing: Callable[[], str | None]  # None when it can run here, else what to install


def _module_missing(module: str, hint: str) -> Callable[[], str | None]:
    def check() -> str | None:
        return None if importlib.util.find_spec(module) is not None else f"{module} is not installed ({hint})"
    return check


def _tensorrt_missing() -> str | None:
    """The TensorRT engine runner needs the tensorrt module and cuda-python's runtime bindings (its buffers)."""
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (pip install 'edgedistill[gpu]'; on a Jetson it comes with JetPack)"
    return cuda_python_missing()


def _ort_provider_missing(provider: str) -> Callable[[], str | None]:
    def check() -> str | None:
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed (pip install 'edgedistill[cpu]' or onnxruntime-gpu)"
        import onnxruntime  # deferred: an extra; the table is read where it is not installed

        if provider in onnxruntime.get_available_providers():
            return None
        extra = ", with TensorRT libraries" if "Tensorrt" in provider else ""
        return f"onnxruntime has no {provider} here (pip install onnxruntime-gpu{extra})"
    return check


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("onnx", ".onnx", ("fp32", "fp16", "int8"),
           "ONNX graph; every precision; run by onnxruntime (CPU, CUDA, TensorRT providers) and OpenVINO (CPU)"),
    Format("trt", ".engine", ("fp32", "fp16", "int8"),
           "serialized TensorRT engine, built on the machine (GPU and TensorRT version) that runs it",
           requires="edgedistill.export.tensorrt:require_tensorrt", build="edgedistill.export.tensorrt:export_engines"),
    Format("torchtrt", ".torchtrt.ep", ("fp32", "fp16"), "Torch-TensorRT (dynamo) exported program",
           requires="edgedistill.export.torchtrt:require_torch_tensorrt",
           build="edgedistill.export.torchtrt:export_programs"),
    Format("npy", ".npy", ("fp32",), "precomputed text embeddings of a fixed vocabulary (no text encoder on the "
                                     "device)"),
    Format("pytorch", ".safetensors", ("fp32",), "the open_clip student as trained (the run's student/ folder)",
           tokenizer="edgedistill.bench.torch_runners:student_tokenizer"),
)}

BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("tensorrt", ("trt",), ("cuda", "jetson"), "edgedistill.runtime.backends:TensorRtRunner",
            _tensorrt_missing),
    Backend("onnxruntime-tensorrt", ("onnx",), ("cuda", "jetson"), "edgedistill.runtime.backends:OrtRunner",
            _ort_provider_missing("TensorrtExecutionProvider")),
    Backend("torch-tensorrt", ("torchtrt",), ("cuda",), "edgedistill.bench.torch_runners:TorchTrtRunner",
            _module_missing("torch_tensorrt", "pip install 'edgedistill[gpu]'")),
    Backend("onnxruntime-cuda", ("onnx",), ("cuda", "jetson"), "edgedistill.runtime.backends:OrtRunner",
            _ort_provider_missing("CUDAExecutionProvider")),
    # onnxruntime before OpenVINO: on the flagship student (MobileNetV3) onnxruntime was faster in every idle
    # condition measured (benchmarks/README.md, ort_vs_openvino.py); a bench.json measured here overrides it.
    Backend("onnxruntime-cpu", ("onnx",), ("cpu",), "edgedistill.runtime.backends:OrtRunner",
            _ort_provider_missing("CPUExecutionProvider")),
    Backend("openvino-cpu", ("onnx",), ("cpu",), "edgedistill.runtime.backends:OpenVinoRunner",
            _module_missing("openvino", "pip install 'edgedistill[openvino]'")),
    Backend("pytorch-cuda", ("pytorch",), ("cuda", "jetson"), "edgedistill.bench.torch_runners:TorchRunner",
            _module_missing("torch", "the training install: pip install 'edgedistill[train]'")),
    Backend("pytorch-cpu", ("pytorch",), ("cpu",), "edgedistill.bench.torch_runners:TorchRunner",
            _module_missing("torch", "the training install: pip install 'edgedistill[train]'")),
)}

# Why a format has no backend on a device (a skipped row says this).
NO_BACKEND = {
    ("trt", "cpu"): "TensorRT engines run on a GPU: use --device cuda or jetson on the machine the engine was "
                    "built for",
    ("torchtrt", "cpu"): "Torch-TensorRT programs run on a GPU: use --device cuda",
    ("torchtrt", "jetson"): "Torch-TensorRT has no Jetson build; bench the TensorRT engine instead",
}


def backends_for(fmt: str, device: str) -> list[Backend]:
    """The backends that run ``fmt`` on ``device``, in order of preference."""
    return [b for b in BACKENDS.values() if fmt in b.formats and device in b.devices]


def why_not(fmt: str, device: str) -> str:
    """Why nothing runs ``fmt`` on ``device``."""
    if fmt == "npy":
        return "precomputed text embeddings, not a model (used by devices that run no text encoder)"
    if fmt not in FORMATS:
        return f"unknown artifact format {fmt!r}; this edgedistill cannot run it"
    return NO_BACKEND.get((fmt, device), f"no backend runs {fmt} on {device}")


def resolve(reference: str) -> Any:
    """The object a "module:attribute" string names (imported now)."""
    module, _, attr = reference.partition(":")
    return getattr(importlib.import_module(module), attr)
