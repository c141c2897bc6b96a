"""Torch-TensorRT: compile a student's torch module to TensorRT-backed ExportedProgram (``.ep``) and load it back.

The ONNX -> TensorRT path (``tensorrt.py``) is the main one; this is the route for people who stay in PyTorch.
It offers fp32 and fp16 only: INT8 needs a calibrated QDQ graph, which the ONNX path makes.

Torch-TensorRT changed its precision API: up to 2.8 ``enabled_precisions={torch.float16}`` asked for fp16 (weak
typing); newer releases build strongly typed networks (``use_explicit_typing=True`` by default, required by
TensorRT 11), ignore ``enabled_precisions`` and lower to fp16 with ``enable_autocast=True`` +
``autocast_low_precision_type``. The installed version's signature decides which one is used. Unlike the ONNX
path, the precision is not in a graph here: the module is fp32, so on a release without autocast fp16 needs the
weak-typing request (``enabled_precisions`` with fp16, ``use_explicit_typing=False``); fp32 never asks for weak
typing (``precision_kwargs``; docs/gpu.md, "Precision requests").

CUDA and the GPU's identity come from torch here (this module needs torch anyway); the engine side
(export/tensorrt.py, runtime/tensorrt.py) asks cuda-python. Both describe the same GPU the same way.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Collection

import edgedistill.core.atomic as atomic
from edgedistill.core.errors import UserError
import edgedistill.runtime.manifest as artifacts
from edgedistill.core.hashing import sha256_file
from edgedistill.core.terminal import make_console
from edgedistill.runtime.tensorrt import (BatchProfile, check_compatible, device_metadata, read_sidecar, sidecar_path,
                                          verify_sha256)

REBUILD_HINT = "recompile it here with `edgedistill export --format torchtrt`"
DEVICE = "cuda"  # where compilation runs; the CPU tests swap it to run the orchestration without a GPU


def require_torch_tensorrt() -> ModuleType:
    """The ``torch_tensorrt`` module, or a one-line UserError saying which requirement is missing."""
    try:
        import torch_tensorrt  # deferred: optional (the gpu extra)
    except ImportError as e:
        if e.name == "torch_tensorrt":
            raise UserError("Torch-TensorRT export needs torch-tensorrt, which is not installed (the gpu extra): "
                            "pip install -e '.[gpu]' on a machine with an NVIDIA GPU and CUDA") from None
        raise UserError(f"Torch-TensorRT export needs torch-tensorrt, which is installed but does not load ({e}): "
                        f"install the torch-tensorrt release that matches torch with pip install -e '.[gpu]'") from None
    except OSError as e:
        raise UserError(f"Torch-TensorRT export needs torch-tensorrt, which is installed but does not load ({e}): "
                        f"install the torch-tensorrt release that matches torch with pip install -e '.[gpu]'") from None
    require_cuda("Torch-TensorRT export")
    return torch_tensorrt


def require_cuda(what: str) -> None:
    """UserError unless torch sees an NVIDIA GPU (Torch-TensorRT runs through torch's CUDA)."""
    import torch  # deferred: this module imports on a machine without the training stack's CUDA
    if not torch.cuda.is_available():
        raise UserError(f"{what} needs an NVIDIA GPU and torch sees none (torch.cuda.is_available() is False): "
                        f"run it on the target device with CUDA and pip install -e '.[gpu]', "
                        f"or export with --format onnx for CPU")


def torch_gpu() -> dict[str, Any]:
    """torch's view of the current GPU, in runtime.cuda.gpu_properties's keys (for ``device_metadata``)."""
    import torch  # deferred: this module imports on a machine without the training stack's CUDA
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"gpu_name": str(props.name), "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": int(props.multi_processor_count), "cuda": torch.version.cuda}


def _parameters(*functions: Any) -> set[str]:
    names: set[str] = set()
    for fn in functions:
        try:
            names |= set(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            continue
    return names


def _settings_fields(torch_tensorrt: ModuleType) -> set[str]:
    # options a release takes through **kwargs are still fields of its CompilationSettings
    settings = getattr(getattr(torch_tensorrt, "dynamo", None), "CompilationSettings", None)
    try:
        return {f.name for f in dataclasses.fields(settings)} if settings is not None else set()
    except TypeError:
        return set()


def precision_kwargs(params: Collection[str], precision: str, torch: Any) -> dict[str, Any]:
    """Compile options asking for ``precision`` ('fp32'|'fp16') in the API that ``params`` (names) describes.

    - autocast releases (strongly typed): ``use_explicit_typing=True``, and for fp16 ``enable_autocast`` with the
      low-precision type; ``enabled_precisions`` is deprecated and ignored there, so it is never passed.
    - releases up to 2.8 (no autocast): fp16 is only reachable by weak typing, ``enabled_precisions={fp16, fp32}``
      (and ``use_explicit_typing=False`` where that switch exists, so the request is honoured). TensorRT
      deprecated weak typing in 10.12 and removed it in 11; these releases build against TensorRT 10, where it
      still works. fp32 asks for nothing weak: strong typing where the switch exists (the module is fp32, so
      the engine is), else the release's default (fp32 only).
    """
    half = precision == "fp16"
    if "enable_autocast" in params:
        # strongly typed releases: enabled_precisions is deprecated and ignored; autocast inserts the casts
        kwargs: dict[str, Any] = {"use_explicit_typing": True}
        if half:
            low = "autocast_low_precision_type" if "autocast_low_precision_type" in params else "low_precision_type"
            kwargs.update({"enable_autocast": True, low: torch.float16})
        return kwargs
    if not half:
        return {"use_explicit_typing": True} if "use_explicit_typing" in params else {}
    kwargs = {"enabled_precisions": {torch.float16, torch.float32}}
    if "use_explicit_typing" in params:
        kwargs["use_explicit_typing"] = False  # weak typing, so that enabled_precisions takes effect
    return kwargs


def _example_batch(profile: BatchProfile) -> int:
    # torch.export specialises a size-1 example to the constant 1; trace with 2 when the profile allows more
    return 1 if profile.max == 1 else min(max(2, profile.opt), profile.max)


def _device_metadata() -> dict[str, Any]:
    import tensorrt as trt  # deferred: optional; torch-tensorrt depends on it, so it is there when this runs
    return device_metadata(trt, torch_gpu())


def compile_torchtrt(module: Any, example: Any, profile: BatchProfile, precision: str, out_path: Path,
                     console: Any = None) -> dict[str, Any]:
    """Compile ``module`` with Torch-TensorRT for inputs like ``example`` (B, ...): its item shape and dtype
    (float32 images, int64 tokens), with the batch axis dynamic over ``profile``.

    Writes the ExportedProgram to ``out_path`` (``.ep``) and its metadata to ``<out_path>.json`` atomically;
    returns the metadata.
    """
    if precision == "int8":
        raise UserError("Torch-TensorRT export offers fp32 and fp16; for INT8 use --format trt --int8 "
                        "(a calibrated QDQ ONNX graph)")
    if precision not in ("fp32", "fp16"):
        raise UserError(f"unknown precision '{precision}' for Torch-TensorRT; choose fp32 or fp16")
    import torch  # deferred: torch-tensorrt is an extra; this module imports without it

    torch_tensorrt = require_torch_tensorrt()
    console = console or make_console(stderr=True)
    out_path = Path(out_path)
    module = module.eval().to(DEVICE)
    item_shape = tuple(example.shape[1:])
    batch = _example_batch(profile)
    # the example's own values and dtype (float images, int64 token ids), repeated to the tracing batch
    trace_input = example.detach()[:1].to(DEVICE).repeat(batch, *([1] * len(item_shape)))
    if trace_input.is_floating_point():
        trace_input = trace_input.float()
    dtype = trace_input.dtype
    dynamic = profile.max > 1
    dynamic_shapes = ({0: torch.export.Dim("batch", min=profile.min, max=profile.max)},) if dynamic else None

    if dynamic:
        spec = torch_tensorrt.Input(min_shape=(profile.min, *item_shape), opt_shape=(profile.opt, *item_shape),
                                    max_shape=(profile.max, *item_shape), dtype=dtype)
    else:
        spec = torch_tensorrt.Input(shape=(1, *item_shape), dtype=dtype)
    compile_fn = torch_tensorrt.dynamo.compile
    params = _parameters(torch_tensorrt.compile, compile_fn) | _settings_fields(torch_tensorrt)
    kwargs = precision_kwargs(params, precision, torch)
    inputs_key = "arg_inputs" if "arg_inputs" in _parameters(compile_fn) else "inputs"

    with console.status(f"compiling with Torch-TensorRT ({precision}, batch {profile.describe()})"):
        with torch.no_grad():
            # our own export (not torch_tensorrt.compile's) so the batch range is exactly the profile's
            program = torch.export.export(module, (trace_input,), dynamic_shapes=dynamic_shapes)
            trt_module = compile_fn(program, **{inputs_key: [spec]}, **kwargs)
        _save(torch_tensorrt, trt_module, trace_input, dynamic_shapes, out_path)

    digest = sha256_file(out_path)
    meta: dict[str, Any] = {
        "format": "torch_tensorrt",
        "program": out_path.name,
        "sha256": digest,
        **_device_metadata(),
        "torch_tensorrt_version": str(getattr(torch_tensorrt, "__version__", "unknown")),
        "torch_version": str(torch.__version__),
        "precision": precision,
        "profile": {"min": profile.min, "opt": profile.opt, "max": profile.max},
        "input_shape": ["B", *[int(d) for d in item_shape]],
        "input_dtype": str(dtype).removeprefix("torch."),
        "precision_api": "autocast" if kwargs.get("enable_autocast") else
                         "explicit_typing" if kwargs.get("use_explicit_typing") else
                         "enabled_precisions" if "enabled_precisions" in kwargs else "default",
    }
    atomic.write_json(sidecar_path(out_path), meta)
    console.print(f"Torch-TensorRT program {out_path} ({precision}, batch {profile.describe()})")
    return meta


def _save(torch_tensorrt: ModuleType, trt_module: Any, trace_input: Any, dynamic_shapes: Any,
          out_path: Path) -> None:
    """``torch_tensorrt.save`` to a staging folder, then an atomic rename onto ``out_path``."""
    params = _parameters(torch_tensorrt.save)
    kwargs: dict[str, Any] = {("arg_inputs" if "arg_inputs" in params else "inputs"): [trace_input]}
    if dynamic_shapes is not None:
        if "dynamic_shapes" in params:
            kwargs["dynamic_shapes"] = dynamic_shapes
        elif "retrace" in params:
            kwargs["retrace"] = False  # older releases: keep the graph's symbolic batch instead of re-tracing
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        staged = staging / out_path.name  # keeps the .ep name: some releases look at the suffix
        torch_tensorrt.save(trt_module, str(staged), **kwargs)
        with atomic.atomic_path(out_path) as tmp:
            os.replace(staged, tmp)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_torchtrt(path: Path) -> Callable[..., Any]:
    """A saved Torch-TensorRT program as a callable module, after checking it was built for this GPU."""
    import torch  # deferred: torch-tensorrt is an extra; this module imports without it

    path = Path(path)
    if not path.is_file():
        raise UserError(f"Torch-TensorRT program {path} not found; compile it with "
                        f"`edgedistill export --format torchtrt`")
    kind = "Torch-TensorRT program"
    meta = read_sidecar(path, kind=kind, hint=REBUILD_HINT)
    require_torch_tensorrt()  # registers the tensorrt ops the program calls
    check_compatible(meta, _device_metadata(), what=f"{kind} {path}", hint=REBUILD_HINT)
    verify_sha256(path, meta, kind=kind, hint=REBUILD_HINT)
    try:
        return torch.export.load(str(path)).module()
    except Exception as e:  # noqa: BLE001 - torch/TensorRT raise many types here; the user needs one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:240]
        raise UserError(f"{kind} {path} does not load here ({type(e).__name__}: {first}); it needs the "
                        f"torch {meta.get('torch_version', '?')} / torch-tensorrt "
                        f"{meta.get('torch_tensorrt_version', '?')} it was compiled with: {REBUILD_HINT}") from e


# ------------------------------------------------------------------------------------------------ the export
def export_programs(job: Any, graphs: dict[tuple[str, str], Path]) -> list[dict[str, Any]]:
    """``--format torchtrt`` (formats.FORMATS['torchtrt'].build): Torch-TensorRT (dynamo) programs of both
    encoders at the plan's precision, checked against PyTorch like the graphs; ``job`` is the exporter's
    ExportJob (the ONNX ``graphs`` are not used: the programs compile from the PyTorch encoders)."""
    import torch  # deferred: torch-tensorrt is an extra; this module imports without it

    profile = BatchProfile(*job.plan.profile)
    precision = job.plan.precisions[0] if job.plan.precisions else "fp32"
    entries = []
    for encoder, module, inputs in (("image", job.image_encoder, job.parity_images),
                                    ("text", job.text_encoder, job.tokens)):
        path = job.out / f"{encoder}_{precision}.torchtrt.ep"
        info = compile_torchtrt(module, torch.from_numpy(inputs[:1]), profile, precision, path, console=job.console)
        compiled = load_torchtrt(path)
        with torch.no_grad():
            got = torch.cat([compiled(torch.from_numpy(inputs[i:i + profile.max]).cuda()).float().cpu()
                             for i in range(0, len(inputs), profile.max)]).numpy()
        parity = job.parity(encoder, precision, got, f"Torch-TensorRT {precision} {encoder} encoder", discard=path)
        entry = artifacts.artifact_entry(job.out, path, name=f"{encoder}_{precision}_torchtrt", encoder=encoder,
                                         fmt="torchtrt", precision=precision, parity=parity, compile=info)
        entries.append(entry)
        job.say(entry)
    return entries
