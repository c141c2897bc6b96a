"""``edgedistill export``: a distilled run -> ONNX fp32 / fp16 / INT8 QDQ -> TensorRT engines or Torch-TensorRT.

Every artifact is checked against PyTorch on real images of the recipe's val split before it gets its final
name: a graph that disagrees is deleted and the export stops (exit 2), so nothing that looks good is wrong.
``export.json`` is written last and lists only verified artifacts. The formats are the table in
``edgedistill.runtime.formats``: the ONNX graphs are always made; a format with a ``build`` function (TensorRT engines,
Torch-TensorRT programs) is built from them and the student by that function.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from rich.console import Console

import edgedistill.core.atomic as atomic
from edgedistill.distill.cache import load_split_manifests
from edgedistill.data.images import open_image
from edgedistill.data.manifest import Manifest
from edgedistill.core.errors import UserError
from edgedistill.distill.evaluate import student_images, student_texts
import edgedistill.runtime.manifest as artifacts
from edgedistill.export.graph import (IMAGE_INPUT, IMAGE_OUTPUT, TEXT_INPUT, TEXT_OUTPUT, ImageEncoder,
                                      TextEncoder, check_default_openvino, check_default_session, cosine_parity,
                                      export_onnx)
from edgedistill.export.targets import load_target
from edgedistill.export.precision import (CALIBRATION_METHODS, ORT_CPU_INT8, TENSORRT_INT8, ImageCalibrationReader,
                                          calibration_data_hash, quantize_int8, to_fp16)
from edgedistill.runtime.formats import BACKENDS, FORMATS, artifact_file, resolve
from edgedistill.core.gates import at_least, at_most, finite
from edgedistill.core.hashing import sha256_file
from edgedistill.core.locations import latest_run
from edgedistill.distill.recipe import Recipe, load_recipe
from edgedistill.runtime.ort import ort_session, run_session
from edgedistill.runtime.choose import TOLERANCE
from edgedistill.runtime.device import cpu_model, isa_flags
from edgedistill.runtime.preprocess import Preprocess
from edgedistill.runtime.probe import geometry_pixels, normalise, probe_image_count, write_probe
from edgedistill.export.tokenizer import save_tokenizer
from edgedistill.core.terminal import make_console, warn
from edgedistill.evaluation.split import ClassPrompts, ValSplit, decode_split, score
from edgedistill.distill.students import Student, load_student

BUILDABLE = tuple(name for name, f in FORMATS.items() if name == "onnx" or f.build)   # what --format may ask for
PARITY_IMAGES = 64            # val images every artifact is compared on
PARITY_CAPTIONS = 64
PROBE_CAPTIONS = 16           # captions in the probe set a device checks the text tower on
MIN_PARITY = {"fp32": 0.9999, "fp16": 0.999}  # mean cosine vs PyTorch; INT8 is reported, not gated
INT8_MIN_COSINE = TOLERANCE  # every parity image, onnxruntime-CPU INT8 flavour: the tolerance load() checks
MAX_INT8_R1_DROP = 1.0        # points of val Recall@1: above this INT8 is kept but flagged
DEFAULT_PROFILE = (1, 8, 32)  # TensorRT batch profile without a target
DEFAULT_WORKSPACE_MB = 4096


@dataclass
class ExportOptions:
    run_dir: Path | None = None
    format: str = "onnx"
    fp16: bool = False
    int8: bool = False
    calib_method: str | None = None
    calib_size: int | None = None
    target: str | None = None
    out: Path | None = None
    text_embeddings: Path | None = None
    threads: int | None = None
    runs_root: Path = field(default_factory=lambda: Path("runs"))
    # False: an onnxruntime-CPU INT8 graph that fails its gate on this CPU is left out (recorded in export.json
    # ``dropped``, with a warning) instead of stopping the export; the demo uses it, the command does not
    int8_required: bool = True


def parity_ok(parity: dict[str, float], precision: str, min_floor: float | None = None) -> bool:
    """The parity gate: mean cosine to PyTorch at least the precision's floor and, with ``min_floor``, every row's
    cosine at least that (the onnxruntime-CPU INT8 graph: the tolerance ``load`` checks on a device). Fails
    closed: a NaN or inf cosine (a broken graph or student) never passes, nor does a non-finite worst row."""
    floor = MIN_PARITY.get(precision)
    mean_ok = finite(parity["cosine_mean"]) if floor is None else at_least(parity["cosine_mean"], floor)
    min_ok = finite(parity["cosine_min"]) if min_floor is None else at_least(parity["cosine_min"], min_floor)
    return mean_ok and min_ok


@dataclass
class Plan:
    """What to build, resolved from the flags and the target preset."""
    precisions: list[str]            # image encoder precisions beyond fp32
    profile: tuple[int, int, int]
    calib_method: str
    calib_size: int
    workspace_mb: int
    target: dict[str, Any] | None
    for_tensorrt: bool               # INT8 graphs for TensorRT: symmetric activations (else uint8 for ORT CPU)


def make_plan(opts: ExportOptions) -> Plan:
    """Flags win over the target preset; the preset wins over the defaults."""
    if opts.format not in BUILDABLE:
        raise UserError(f"unknown --format {opts.format!r}; choose one of {', '.join(BUILDABLE)}")
    target = None
    if opts.target:
        target = load_target(opts.target)
    precisions = [p for p, on in (("fp16", opts.fp16), ("int8", opts.int8)) if on]
    if not precisions and target is not None and target.precision != "fp32":
        precisions = [target.precision]
    if not precisions and opts.format in ("trt", "torchtrt"):
        precisions = ["fp16"]  # an fp32 engine is rarely what a device wants; ask for it with a target
    if opts.format == "torchtrt" and "int8" in precisions:
        raise UserError("--format torchtrt compiles fp32 or fp16 only; for INT8 use --format trt --int8 "
                        "(a calibrated QDQ graph)")
    method = opts.calib_method or (target.calibration.method if target else "entropy")
    if method not in CALIBRATION_METHODS:
        raise UserError(f"unknown --calib-method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    size = opts.calib_size if opts.calib_size is not None else (target.calibration.size if target else 512)
    if size < 1:
        raise UserError(f"--calib-size must be at least 1, not {size}")
    profile = (target.batch.min, target.batch.opt, target.batch.max) if target else DEFAULT_PROFILE
    workspace = target.workspace_mb if target else DEFAULT_WORKSPACE_MB
    for_tensorrt = opts.format == "trt" or (target is not None and target.format == "trt")
    return Plan(precisions, profile, method, size, workspace, target.model_dump() if target else None,
                for_tensorrt)


def _check_backend(fmt: str) -> None:
    """Fail before any work when the machine cannot build the requested format (the table's ``requires``)."""
    requires = FORMATS[fmt].requires
    if requires is not None:
        resolve(requires)()


def _preprocess_desc(student: Student) -> dict[str, Any]:
    return {k: student.preprocess_cfg.get(k) for k in ("size", "mean", "std", "interpolation", "resize_mode")}


def run_export(opts: ExportOptions, console: Console | None = None) -> dict[str, Any]:
    """Export the run's student as the options ask; returns the export.json document."""
    console = console or make_console(stderr=True, soft_wrap=True)
    plan = make_plan(opts)
    _check_backend(opts.format)
    run_dir = Path(opts.run_dir) if opts.run_dir else latest_run(opts.runs_root)
    if not (run_dir / "recipe.yaml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no recipe.yaml); give the out folder of a distill run")
    out = atomic.writable_dir(Path(opts.out) if opts.out else run_dir / "export", "--out")
    prompts = _read_prompts(opts.text_embeddings) if opts.text_embeddings else None
    previous_threads = torch.get_num_threads()
    try:  # a process-wide setting: leave it as found (the demo and tests export in-process)
        if opts.threads:
            torch.set_num_threads(opts.threads)
        with atomic.exclusive_dir(out, "--out"):
            return _export_run(opts, plan, run_dir, out, prompts, console)
    finally:
        torch.set_num_threads(previous_threads)


def _export_run(opts: ExportOptions, plan: Plan, run_dir: Path, out: Path, prompts: list[str] | None,
                console: Console) -> dict[str, Any]:
    recipe = load_recipe(run_dir / "recipe.yaml", ["device=cpu"])
    student = load_student(run_dir / "student", "cpu")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{run_dir / 'student'}")
    manifests = load_split_manifests(recipe)
    val = manifests.get("val") or manifests["train"]
    console.print(f"exporting {run_dir / 'student'} ({student.config['vision_cfg'].get('timm_model_name')}) "
                  f"-> {out}", highlight=False)
    job = ExportJob(opts, plan, recipe, student, tokenizer, val, manifests["train"], out, console)
    entries = job.run()
    if prompts is not None:
        entries.append(job.text_embeddings(prompts))
    tokenizer_files = _save_tokenizer(run_dir / "student", out, console)
    probe = job.write_probe()
    header = {"run_dir": str(run_dir.resolve()), "student": student.name,
              "student_weights_sha256": student.weights_sha256,
              "vision": student.config["vision_cfg"].get("timm_model_name"),
              "embed_dim": student.embed_dim, "text_is_teacher": student.text_is_teacher,
              "preprocess": _preprocess_desc(student),
              "tokenizer": {"open_clip": f"local-dir:{run_dir / 'student'}",
                            "context_length": int(tokenizer.context_length), **tokenizer_files},
              "inputs": {"image": IMAGE_INPUT, "text": TEXT_INPUT},
              "outputs": {"image": IMAGE_OUTPUT, "text": TEXT_OUTPUT},
              "target": plan.target, "batch_profile": list(plan.profile), "probe": probe, "dropped": job.dropped,
              "val": {**job.split.describe(), "prompts": {"prompt": job.prompts.prompt,
                                                          "descriptions": job.prompts.descriptions,
                                                          "description_prompt": job.prompts.description_prompt}}}
    artifacts.write_manifest(out, header, entries)
    return {**header, "artifacts": entries, "out": str(out)}


TOKENIZER_FOLDER = "tokenizer"


def _save_tokenizer(student_dir: Path, out: Path, console: Console) -> dict[str, Any]:
    """The student's tokenizer for devices without open_clip (runtime.tokenizer), next to the artifacts:
    ``{"folder", "files": {name: sha256}}``; empty, with a warning, for a tokenizer that cannot be reproduced."""
    folder = out / TOKENIZER_FOLDER
    try:
        save_tokenizer(f"local-dir:{student_dir}", folder)
    except UserError as e:
        warn(console, f"the tokenizer is not saved for devices ({e}); text on a device then needs open_clip")
        return {}
    return {"folder": TOKENIZER_FOLDER,
            "files": {f.name: sha256_file(f) for f in sorted(folder.iterdir()) if f.is_file()}}


def _read_prompts(path: Path) -> list[str]:
    if not Path(path).is_file():
        raise UserError(f"--text-embeddings: {path} does not exist; give a text file with one prompt a line")
    prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"--text-embeddings: {path} holds no prompts; write one prompt a line")
    return prompts


class Int8DoesNotHold(UserError):
    """The onnxruntime-CPU INT8 graph does not keep the tolerance on this CPU (its gate failed)."""


class ExportJob:
    """One export: the student, the val split with the PyTorch references, and the artifacts made so far.

    Builders of other formats (``formats.FORMATS[...].build``) get the job and use ``parity``, ``val_metrics`` and
    ``say``; their inputs are ``parity_images`` / ``tokens`` (parity) and ``images`` (val accuracy).
    """

    def __init__(self, opts: ExportOptions, plan: Plan, recipe: Recipe, student: Student, tokenizer: Any,
                 val: Manifest, train: Manifest, out: Path, console: Console) -> None:
        self.opts, self.plan, self.recipe, self.student = opts, plan, recipe, student
        self.tokenizer, self.train, self.out, self.console = tokenizer, train, out, console
        self.preprocess = Preprocess(_preprocess_desc(student))  # the pixels of open_clip's eval transform
        self.model = student.model.eval().float()
        self.image_encoder, self.text_encoder = ImageEncoder(self.model), TextEncoder(self.model)
        self.prompts = ClassPrompts.from_recipe(recipe)
        with console.status("reading val images"):
            self.images, ok = decode_split(val, _preprocess_desc(student), console)
            self.split = ValSplit.from_manifest(val, ok, self.prompts)
            # the PyTorch student's own numbers, computed exactly as distill and eval compute them
            self.texts = student_texts(student, tokenizer, self.split, torch.device("cpu"))
            self.torch_val = score(self.split, student_images(student, self.split, torch.device("cpu"),
                                                              recipe.eval.batch_size, 0, console),
                                   self.texts.text, self.texts.class_text, "the PyTorch student")
        self.dropped: list[dict[str, str]] = []   # artifacts left out by a gate (int8_required=False)
        self.parity_images = self.images[:PARITY_IMAGES]
        self.tokens = np.asarray(tokenizer(self.split.captions[:PARITY_CAPTIONS] or ["a photo"]), dtype=np.int64)
        self.ref_image = self._torch_embed(self.image_encoder, self.parity_images)
        self.ref_text = self._torch_embed(self.text_encoder, self.tokens)

    @torch.no_grad()
    def _torch_embed(self, encoder: torch.nn.Module, inputs: np.ndarray, batch: int = 64) -> np.ndarray:
        return np.concatenate([encoder(torch.from_numpy(inputs[i:i + batch])).numpy()
                               for i in range(0, len(inputs), batch)]).astype(np.float32)

    # -- the checks every artifact passes ------------------------------------------------------------------
    def parity(self, encoder: str, precision: str, got: np.ndarray, what: str,
               discard: Path | None = None, min_floor: float | None = None) -> dict[str, Any]:
        """Cosine of ``got`` (the artifact's embeddings of the parity inputs) to PyTorch fp32; a UserError (and
        ``discard`` deleted) when it fails the precision's floor (or ``min_floor``) or is not finite."""
        parity = {**cosine_parity(got, self.ref_image if encoder == "image" else self.ref_text),
                  "against": "pytorch fp32", "samples": len(got)}
        if not parity_ok(parity, precision, min_floor):
            if discard is not None:
                discard.unlink(missing_ok=True)
            if min_floor is not None:
                raise Int8DoesNotHold(f"{what} does not hold cosine {min_floor} to PyTorch on this CPU ({cpu_model()}, "
                                f"{' '.join(isa_flags()) or 'no INT8 flags'}): worst val image "
                                f"{parity['cosine_min']:.4f}, mean {parity['cosine_mean']:.4f}; nothing was kept. "
                                f"Try --calib-method percentile or a larger --calib-size, or export without --int8")
            raise UserError(f"{what} disagrees with PyTorch on val data (mean cosine {parity['cosine_mean']:.6f}, "
                            f"needs {MIN_PARITY.get(precision, 'a finite value')}); nothing was kept. Run with "
                            f"--debug and report it")
        return parity

    def val_metrics(self, image_emb: np.ndarray, what: str) -> dict[str, float]:
        """An image artifact's val metrics against the PyTorch student's own text embeddings."""
        return score(self.split, image_emb, self.texts.text, self.texts.class_text, what)

    def say(self, entry: dict[str, Any]) -> None:
        val = entry.get("val") or {}
        r1 = f", val i2t R@1 {val['i2t_r1']:.1f}" if "i2t_r1" in val else ""
        self.console.print(f"  {entry['path']}: {entry['size_mb']:.1f} MB, cosine to PyTorch "
                           f"{entry['parity']['cosine_mean']:.6f}{r1}", highlight=False)

    def write_probe(self) -> dict[str, Any]:
        """The probe set a device checks each artifact on (runtime.probe): the first readable val images as uint8
        pixels and captions as tokens, with the PyTorch fp32 student's embeddings of them."""
        n = probe_image_count(self.preprocess.config.size)
        pixels = np.stack([geometry_pixels(open_image(self.split.manifest.entries[int(row)].image), self.preprocess)
                           for row in self.split.rows[:n]])
        image_ref = self._torch_embed(self.image_encoder, normalise(pixels, self.preprocess))
        return write_probe(self.out, pixels, image_ref, self.tokens[:PROBE_CAPTIONS], self.ref_text[:PROBE_CAPTIONS])

    # -- artifacts ------------------------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        """The ONNX graphs (fp32 and the plan's precisions), then the format's own build from them."""
        entries: list[dict[str, Any]] = []
        graphs: dict[tuple[str, str], Path] = {}
        for encoder, module, inp, outp in (("image", self.image_encoder, IMAGE_INPUT, IMAGE_OUTPUT),
                                           ("text", self.text_encoder, TEXT_INPUT, TEXT_OUTPUT)):
            precisions = ["fp32"] + [p for p in self.plan.precisions if not (encoder == "text" and p == "int8")]
            for precision in precisions:
                path = self.out / artifact_file(encoder, precision, "onnx")
                try:
                    with self.console.status(f"{encoder} encoder -> ONNX {precision}"):
                        entry = self._onnx(encoder, precision, path, module, inp, outp, graphs)
                except Int8DoesNotHold as e:
                    if self.opts.int8_required:
                        raise
                    warn(self.console, f"{e}: left out of this export")
                    self.dropped.append({"name": f"{encoder}_{precision}_onnx", "reason": str(e)})
                    continue
                graphs[(encoder, precision)] = path
                entries.append(entry)
                self.say(entry)
        self._flag_int8(entries)
        build = FORMATS[self.opts.format].build
        if build is not None:
            entries += resolve(build)(self, graphs)
        return entries

    def _onnx(self, encoder: str, precision: str, path: Path, module: torch.nn.Module, inp: str, outp: str,
              made: dict[tuple[str, str], Path]) -> dict[str, Any]:
        """Make one ONNX artifact under a hidden name, check it against PyTorch, then give it its name."""
        staging = path.with_name(f".{path.stem}.unverified.onnx")
        inputs = self.parity_images if encoder == "image" else self.tokens
        info: dict[str, Any] = {}
        try:
            if precision == "fp32":
                info = export_onnx(module, torch.from_numpy(inputs[:2]), staging, inp, outp)
            elif precision == "fp16":
                to_fp16(made[(encoder, "fp32")], staging)
            else:
                info = {"calibration": self._calibrate(made[(encoder, "fp32")], staging, inp),
                        # which runtime this INT8 graph is made for, and the CPU its own check ran on
                        "flavour": "tensorrt" if self.plan.for_tensorrt else "onnxruntime-cpu",
                        "checked_on": {"cpu": cpu_model(), "flags": list(isa_flags())}}
            check_default_session(staging, inputs[:2])  # a user's default session must load and run it
            if BACKENDS["openvino-cpu"].missing() is None:  # bench and load() run every graph on OpenVINO too
                check_default_openvino(staging, inputs[:2])
            session = ort_session(staging, self.opts.threads)
            # the onnxruntime-CPU INT8 flavour must hold load()'s tolerance on this CPU; the TensorRT flavour is
            # judged by its engine on the GPU, not by onnxruntime's CPU kernels
            gate = INT8_MIN_COSINE if precision == "int8" and not self.plan.for_tensorrt else None
            parity = self.parity(encoder, precision, run_session(session, inputs), f"{encoder} encoder ONNX "
                                                                                    f"{precision}", min_floor=gate)
            val = self.val_metrics(run_session(session, self.images), path.name) \
                if encoder == "image" else None
            staging.replace(path)
            atomic.fsync_dir(path.parent)
        finally:
            staging.unlink(missing_ok=True)
        entry = artifacts.artifact_entry(self.out, path, name=f"{encoder}_{precision}_onnx", encoder=encoder,
                                         fmt="onnx", precision=precision, parity=parity, **info)
        if val is not None:
            entry["val"] = val
            entry["val_pytorch_fp32"] = self.torch_val
        return entry

    def _calibrate(self, fp32: Path, staging: Path, inp: str) -> dict[str, Any]:
        """INT8 ranges from ``calib_size`` training images, drawn with the recipe's seed."""
        n = len(self.train)
        picks = sorted(random.Random(self.recipe.seed).sample(range(n), min(self.plan.calib_size, n)))
        loaded = [(i, _load(self.train, i, self.preprocess)) for i in picks]
        good = [arr for _, arr in loaded if arr is not None]
        if not good:
            raise UserError(f"{self.train.path}: none of the {len(picks)} calibration images could be read")
        if len(good) < len(picks):
            warn(self.console, f"calibration: {len(picks) - len(good)} unreadable images skipped")
        data_hash = calibration_data_hash([self.train.entries[i].image for i, a in loaded if a is not None],
                                          _preprocess_desc(self.student))
        reader = ImageCalibrationReader(inp, len(good), lambda i: good[i])
        return quantize_int8(fp32, staging, reader, self.plan.calib_method, self.recipe.cache.root, data_hash,
                             self.console, settings=TENSORRT_INT8 if self.plan.for_tensorrt else ORT_CPU_INT8)

    def _flag_int8(self, entries: list[dict[str, Any]]) -> None:
        """Say when INT8 costs more than a point of val Recall@1 (kept: the user decides)."""
        for e in entries:
            if e["precision"] != "int8" or "i2t_r1" not in (e.get("val") or {}):
                continue
            drop = self.torch_val["i2t_r1"] - e["val"]["i2t_r1"]
            e["val_r1_drop"] = round(drop, 4)
            if not at_most(drop, MAX_INT8_R1_DROP):  # a NaN drop is flagged too
                warn(self.console, f"INT8 loses {drop:.1f} points of val image->text R@1; try --calib-method "
                                   f"percentile or a larger --calib-size")

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> dict[str, Any]:
        """(P, D) float32 embeddings of a fixed vocabulary, for devices that never run a text encoder."""
        emb = torch.cat([self.text_encoder(self.tokenizer(prompts[i:i + 256]))
                         for i in range(0, len(prompts), 256)]).numpy().astype(np.float32)
        path = self.out / "text_embeddings.npy"
        with atomic.atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, emb, allow_pickle=False)
        prompts_file = self.out / "text_prompts.txt"
        atomic.write_text(prompts_file, "\n".join(prompts) + "\n")
        # the prompts file is part of the bundle: recorded relative, with its sha256, like every artifact
        entry = artifacts.artifact_entry(self.out, path, name="text_embeddings", encoder="text", fmt="npy",
                                         precision="fp32", prompts=prompts_file.name,
                                         prompts_sha256=sha256_file(prompts_file), count=len(prompts))
        self.console.print(f"  {entry['path']}: {len(prompts)} prompt embeddings", highlight=False)
        return entry


def _load(manifest: Manifest, index: int, preprocess: Preprocess) -> np.ndarray | None:
    """One preprocessed image, or None when it cannot be read (skipped, like everywhere else)."""
    try:
        return preprocess.image(open_image(manifest.entries[index].image))
    except Exception:  # noqa: BLE001
        return None
