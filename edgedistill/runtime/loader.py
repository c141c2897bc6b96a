"""``edgedistill.load``: one call opens a distilled student in any exported form and embeds images and text.

    encoder = edgedistill.load("runs/clip_to_mobilenet/export")       # the fastest artifact this machine runs
    emb = encoder.encode_image(["a.jpg", "b.png"])                      # (2, D) float32, L2-normalised
    probs = encoder.zero_shot(["a.jpg"], ["cat", "dog"])                # (1, 2) class probabilities

``path`` is an export folder (``export.json``), one artifact file of it, a run folder (its ``export/`` when there
is one, else the student as trained) or a ``student/`` folder. From an export, each tower runs the artifact and
backend that bench measured fastest on this device (``EXPORT/bench/bench.json``, batch 1, when it was measured on
this processor); without a measurement, the first backend of ``formats.BACKENDS`` that can run here and the
fastest precision of the device (``PRECISION_ORDER``). ``backend`` and ``precision`` narrow the choice (a text tower
with no artifact at ``precision`` falls back to the device order, noted in ``info.notes``); a choice that nothing
satisfies is one clear error. What was picked is in ``encoder.info``. Images are preprocessed and
text tokenised without torch (``runtime``), so an ONNX export runs with numpy, pillow, tokenizers and a runtime.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Callable, Sequence

import numpy as np
from pydantic import ConfigDict, Field

import edgedistill.runtime.choose as choose
import edgedistill.runtime.manifest as artifacts
from edgedistill.core.documents import Document, read_document
from edgedistill.core.errors import UserError
from edgedistill.core.gates import at_least, at_most
from edgedistill.core.hashing import sha256_bytes, sha256_file
from edgedistill.core.terminal import safe
from edgedistill.runtime.backends import GraphSpec, Runner, candidates, flavour_mismatch
from edgedistill.runtime.choose import TOLERANCE, Choice, rule_rank
from edgedistill.runtime.device import resolve_device
from edgedistill.runtime.encoder import Encoder, EncoderInfo, TextTable
from edgedistill.runtime.formats import BACKENDS, FORMATS, PRECISIONS, resolve
from edgedistill.runtime.limits import check_batch, check_threads
from edgedistill.runtime.preprocess import ImageInput, Preprocess
from edgedistill.runtime.probe import read_probe, unit, user_probe
from edgedistill.runtime.tokenizer import CONFIG_FILE, TOKENIZER_FILE, load_tokenizer


# ---------------------------------------------------------------------------------------------------- load

def load(path: str | Path, device: str = "auto", backend: str = "auto", precision: str | None = None,
         threads: int | None = None, spin: bool | None = None, *, measure: bool = True,
         probe: Sequence[ImageInput] | None = None, batch: int = 1, tolerance: float = TOLERANCE,
         remeasure: bool = False) -> Encoder:
    """Open ``path`` (see the module docstring) on ``device`` (auto, cpu, cuda, jetson) -> Encoder.

    ``measure``: choose by measuring on this device (cached; ``remeasure`` measures again), else by a bench report
    of this device or the rule. ``probe``: your own images to check accuracy on (photos of your domain) instead of
    the export's probe set. ``batch``: the batch you will call with (timed beside batch 1). ``tolerance``: the
    minimum cosine to the fp32 reference an artifact must keep. ``spin``: whether onnxruntime's pool threads spin
    between calls (None: onnxruntime's default, on); off suits a process that does other work on the same cores.
    """
    device = resolve_device(device)
    _check_request(backend, precision, device, batch, tolerance)
    threads = check_threads(threads)
    export_dir, pinned = _export_of(Path(path))
    if export_dir is None:
        return _load_student(_student_folder(Path(path)), device, threads, str(path), batch)
    doc = artifacts.read_manifest(export_dir)
    preprocess = _preprocess(doc["preprocess"], export_dir / artifacts.MANIFEST)
    check_batch(batch, preprocess.input_size, doc["embed_dim"])
    tokenizer = bundle_tokenizer(export_dir, doc)  # a damaged bundle is refused before anything runs
    table = _text_table(doc, export_dir)
    towers = {"image": _options(doc, export_dir, "image", device, backend, precision, pinned)}
    notes: list[str] = []
    text = _options(doc, export_dir, "text", device, backend, precision, pinned, required=False)
    if not text and precision is not None:  # exports hold text in fp32 (fp16): an int8 request keeps its text
        text = _options(doc, export_dir, "text", device, backend, None, pinned, required=False)
        if text:
            notes.append(f"no {precision} text encoder in this export: text runs at "
                         f"{rule_rank(text, device)[0].artifact.get('precision')} (the choice below)")
    if text:
        towers["text"] = text
    request = pinned is not None or backend != "auto" or precision is not None
    towers = {tower: choose.trusted(options, notes) for tower, options in towers.items()}
    expect = GraphSpec(preprocess.config.size, doc["embed_dim"])  # what every graph opened here must take and give
    decide = _Decision(export_dir, doc, device, threads, spin, batch, tolerance, request, notes, expect)
    if measure and any(decide.needs_measuring(o) for o in towers.values()):
        decide.measure(towers, probe, preprocess, remeasure)
    chosen = {tower: decide.pick(tower, options) for tower, options in towers.items()}
    image, text_choice = chosen["image"], chosen.get("text")
    info = EncoderInfo(str(path), device, image.describe(), text_choice.describe() if text_choice else None,
                       decide.chosen_by["image"], doc.get("student_weights_sha256") or image.artifact.get("sha256"),
                       notes, decide.evidence())
    if tokenizer is None and text_choice is not None:
        info.notes.append("no tokenizer saved in this export (made before edgedistill saved one, or its tokenizer "
                          "could not be converted): text needs a new export")
    opened = {t: decide.runners.pop(c.key, None) or _open(c, device, threads, spin, decide.expect)
              for t, c in chosen.items()}
    return Encoder(opened["image"], opened.get("text") or table, preprocess, tokenizer, doc["embed_dim"], info)


class _Decision:
    """How each tower's artifact is chosen: measured here (cached), a bench report of this device, or the rule."""

    def __init__(self, export_dir: Path, doc: dict[str, Any], device: str, threads: int | None,
                 spin: bool | None, batch: int, tolerance: float, request: bool, notes: list[str],
                 expect: GraphSpec) -> None:
        self.export_dir, self.doc, self.device, self.threads, self.spin = export_dir, doc, device, threads, spin
        self.batch, self.tolerance, self.request, self.notes = batch, tolerance, request, notes
        self.measured: dict[str, list[choose.Measured]] = {}
        self.chosen_by: dict[str, str] = {}
        self.runners: dict[str, Runner] = {}   # opened while measuring: the chosen ones are reused
        self.how = ""
        self.expect = expect
        # a bench report of this device (run or export folder) decides before anything is measured
        self.bench = choose.bench_evidence([export_dir / "bench", export_dir.parent / "bench", export_dir], device,
                                           batch)

    def needs_measuring(self, options: list[Choice]) -> bool:
        """More than one option (or a request to check) and no bench report of this device that ranks them."""
        return (len(options) > 1 or self.request) and not any(c.key in self.bench for c in options)

    def measure(self, towers: dict[str, list[Choice]], probe: Sequence[ImageInput] | None,
                preprocess: Preprocess, remeasure: bool) -> None:
        ref = read_probe(self.export_dir, self.doc.get("probe"), preprocess, self.doc["embed_dim"])
        if probe is not None:
            ref = user_probe(probe, preprocess)
        if ref is None:
            self.notes.append("this export carries no probe set (exported before edgedistill measured on the "
                              "device): chosen without measuring; export again, or pass probe=[your images]")
            return
        key = choose.device_key(self.device, self.threads, self.batch, {
            "export": sha256_file(self.export_dir / artifacts.MANIFEST), "tolerance": self.tolerance,
            "probe": "export" if probe is None else sha256_bytes(ref.pixels.tobytes()), "spin": self.spin,
            "towers": {t: sorted(c.key for c in o) for t, o in towers.items()}})
        cached = None if remeasure else choose.read_cached(key)
        if cached is not None:
            self.measured, self.how = cached, "measured (cached)"
            return
        for options in towers.values():  # a damaged file is an error to fix, never a candidate quietly skipped
            for a in {c.artifact["name"]: c.artifact for c in options}.values():
                artifacts.verify_artifact(self.export_dir, a)
        if ref.image_ref is None:
            ref.image_ref = self._fp32_reference(towers["image"], ref.pixels)
        inputs = {"image": (ref.pixels, ref.image_ref), "text": (ref.tokens, ref.text_ref)}
        for tower, options in towers.items():
            x, y = inputs[tower]
            if x is None or y is None or not self.needs_measuring(options):
                continue
            self.measured[tower] = choose.measure(options, x, y, {1, self.batch}, self._open_keep, self.tolerance)
        choose.write_cached(key, self.measured)
        self.how = "measured"

    def _open_keep(self, c: Choice) -> Runner:
        runner = _open(c, self.device, self.threads, self.spin, self.expect)
        self.runners[c.key] = runner
        return runner

    def _fp32_reference(self, options: list[Choice], pixels: Any) -> Any:
        """The fp32 ONNX graph on onnxruntime CPU embeds a user's probe: the export verified it against PyTorch."""
        fp32 = next((a for a in self.doc["artifacts"] if a.get("encoder") == "image" and a.get("format") == "onnx"
                     and a.get("precision") == "fp32"), None)
        if fp32 is None or BACKENDS["onnxruntime-cpu"].missing() is not None:
            raise UserError("probe= needs the export's fp32 ONNX image graph and onnxruntime to compute the "
                            "reference embeddings; leave probe out to use the export's own probe set")
        runner = _open(Choice(fp32, self.export_dir, "onnxruntime-cpu"), "cpu", self.threads, self.spin,
                       self.expect)
        return unit(runner.embed(pixels, 32))

    def pick(self, tower: str, options: list[Choice]) -> Choice:
        measured = self.measured.get(tower)
        best = choose.fastest(options, measured, self.batch) if measured else None
        if measured and best is None:
            failed = ", ".join(f"{m.key} {m.reason}" for m in measured)
            warnings.warn(f"no artifact of the {tower} encoder holds cosine {self.tolerance} to fp32 on this device "
                          f"({failed}); loading {'the request' if self.request else 'the rule'}'s choice",
                          stacklevel=3)
            self.notes.append(f"{tower}: nothing passed the accuracy check here ({failed})")
        if len(options) == 1 and self.request:
            self.chosen_by[tower] = "request"
            return options[0]
        if best is not None:
            self.chosen_by[tower] = self.how
            return best
        ranked = [c for c in options if c.key in self.bench]
        if ranked:
            self.chosen_by[tower] = "bench.json"
            return min(ranked, key=lambda c: self.bench[c.key])
        self.chosen_by[tower] = "request" if self.request else "rule"
        return choose.rule_rank(options, self.device)[0]

    def evidence(self) -> dict[str, Any]:
        return {tower: [asdict(m) for m in rows] for tower, rows in self.measured.items()}


def _check_request(backend: str, precision: str | None, device: str, batch: int = 1,
                   tolerance: float = TOLERANCE) -> None:
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise UserError(f"batch must be a whole number of at least 1, not {batch!r}")
    if not at_least(tolerance, 0.0) or not at_most(tolerance, 1.0):  # NaN fails closed
        raise UserError(f"tolerance is a minimum cosine between 0 and 1, not {tolerance!r}")
    if backend != "auto":
        if backend not in BACKENDS:
            raise UserError(f"unknown backend {backend!r}; choose auto or one of {', '.join(BACKENDS)}")
        b = BACKENDS[backend]
        if device not in b.devices:
            raise UserError(f"backend {backend} does not run on {device} (it runs on {', '.join(b.devices)})")
        missing = b.missing()
        if missing:
            raise UserError(f"backend {backend} cannot run here: {missing}")
    if precision is not None and precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")


def _export_of(path: Path) -> tuple[Path | None, Path | None]:
    """(export folder, pinned artifact file or None); (None, None) for a student to run in PyTorch."""
    if path.is_file():
        folder = path.parent
        if not (folder / artifacts.MANIFEST).is_file():
            raise UserError(f"{path}: an artifact is loaded with the export.json beside it (preprocessing, "
                            f"tokenizer, sha256); none in {folder}")
        return folder, None if path.name == artifacts.MANIFEST else path
    if (path / artifacts.MANIFEST).is_file():
        return path, None
    if (path / "recipe.yaml").is_file() and (path / "export" / artifacts.MANIFEST).is_file():
        return path / "export", None
    if path.is_dir() and ((path / "student").is_dir() or (path / "open_clip_config.json").is_file()):
        return None, None
    raise UserError(f"{path} is none of: an export folder (export.json), an artifact file, a run folder or a "
                    f"student/ folder; give one of those")


def _options(doc: dict[str, Any], export_dir: Path, encoder: str, device: str, backend: str,
             precision: str | None, pinned: Path | None, required: bool = True) -> list[Choice]:
    """Every (artifact, backend) that can run one tower here within the request ([] for a missing text tower)."""
    options = []
    for a in doc["artifacts"]:
        if a.get("encoder") != encoder or a.get("format") == "npy" or (precision and a.get("precision") != precision):
            continue
        if pinned is not None and encoder == _pinned_encoder(doc, export_dir, pinned) and \
                export_dir / a["path"] != pinned:
            continue
        for b in BACKENDS.values():
            if a.get("format") in b.formats and device in b.devices and backend in ("auto", b.name) \
                    and b.missing() is None and flavour_mismatch(a, b.name) is None:
                options.append(Choice(a, export_dir, b.name))
    if not options and required:
        raise UserError(f"nothing in {export_dir} runs the {encoder} encoder on {device}"
                        f"{' with ' + backend if backend != 'auto' else ''}{' at ' + precision if precision else ''};"
                        f" it holds {', '.join(sorted({a['name'] for a in doc['artifacts']}))}")
    return options


def _pinned_encoder(doc: dict[str, Any], export_dir: Path, pinned: Path) -> str:
    for a in doc["artifacts"]:
        if export_dir / a["path"] == pinned:
            return str(a.get("encoder"))
    raise UserError(f"{pinned} is not listed in {export_dir / artifacts.MANIFEST}; give an artifact of that export")


def _open(choice: Choice, device: str, threads: int | None, spin: bool | None = None,
          expect: GraphSpec | None = None) -> Runner:
    path = artifacts.verify_artifact(choice.export_dir, choice.artifact)
    cand = next(c for c in candidates(choice.artifact, path, device, threads, spin=spin, expect=expect)
                if c.backend == choice.backend)
    if cand.make is None:
        raise UserError(f"{choice.artifact['name']} cannot run on {choice.backend}: {cand.reason}")
    return cand.make()


def _preprocess(desc: Any, source: Path) -> Preprocess:
    """The eval transform a document describes; a bad description is one line naming the document."""
    try:
        return Preprocess(desc)
    except UserError as e:
        raise UserError(f"{safe(source)}: {e}") from None


def _text_table(doc: dict[str, Any], export_dir: Path) -> TextTable | None:
    """The precomputed embeddings of a fixed vocabulary (P, D), for an export without a text encoder: the array
    and its prompts file both checked against their sha256 and against each other."""
    table = next((a for a in doc["artifacts"] if a.get("format") == "npy" and a.get("encoder") == "text"), None)
    if table is None:
        return None
    path = artifacts.verify_artifact(export_dir, table)
    prompts_file = artifacts.verify_file(export_dir, table.get("prompts") or "text_prompts.txt",
                                         table.get("prompts_sha256"), f"the prompts file of {table['name']}")
    try:
        prompts = prompts_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"the prompts file {safe(prompts_file)} is not readable UTF-8 text ({type(e).__name__}); "
                        f"export again") from None
    embeddings = artifacts.read_array(path, "text table", "f", 2).astype(np.float32)
    if embeddings.shape != (len(prompts), doc["embed_dim"]):
        raise UserError(f"text table {safe(path)} is {embeddings.shape[0]} x {embeddings.shape[1]}, but "
                        f"{safe(prompts_file)} holds {len(prompts)} prompts and embed_dim is {doc['embed_dim']}; "
                        f"export again")
    return TextTable(embeddings, prompts)


def bundle_tokenizer(export_dir: Path, doc: dict[str, Any]) -> Callable[[Sequence[str]], Any] | None:
    """The export's own tokenizer (tokenizers + ftfy, no torch), every file checked against its sha256 in
    export.json; None for an export that records none (never a folder outside the bundle)."""
    entry = doc.get("tokenizer") or {}
    files = entry.get("files") or {}
    if not files:
        return None
    folder_name = entry.get("folder") or "tokenizer"
    folder = artifacts.bundle_file(export_dir, folder_name, "tokenizer.folder")
    needed = [f for f in (TOKENIZER_FILE, CONFIG_FILE) if f not in files]
    if needed:
        raise UserError(f"{export_dir / artifacts.MANIFEST}: tokenizer.files does not list {', '.join(needed)}; "
                        f"re-export")
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{safe(folder)} lacks {', '.join(safe(m) for m in sorted(missing))} of the tokenizer "
                        f"export.json lists; re-export (a bundle carries its own tokenizer)")
    for name, digest in files.items():
        artifacts.verify_file(export_dir, f"{folder_name}/{name}", digest, "tokenizer file")
    return load_tokenizer(folder)


def _student_folder(path: Path) -> Path:
    return path / "student" if (path / "student").is_dir() else path


class _ModelCfg(Document):
    model_config = ConfigDict(extra="allow", strict=True)
    embed_dim: Annotated[int, Field(ge=1)]


class _StudentInfo(Document):
    model_config = ConfigDict(extra="allow", strict=True)
    weights_sha256: str | None = None


class StudentConfig(Document):
    """A student folder's ``open_clip_config.json`` as far as load() reads it."""
    model_config = ConfigDict(extra="allow", strict=True)
    model_cfg: _ModelCfg
    preprocess_cfg: dict[str, Any]
    edgedistill: _StudentInfo | None = None


def _load_student(folder: Path, device: str, threads: int | None, source: str, batch: int = 1) -> Encoder:
    """The student as trained, on PyTorch (needs the training install)."""
    config_path = folder / "open_clip_config.json"
    cfg = read_document(config_path, StudentConfig, "student config", "distill again, or load its export")
    preprocess = _preprocess(cfg.preprocess_cfg, config_path)
    check_batch(batch, preprocess.input_size, cfg.model_cfg.embed_dim)
    backend = "pytorch-cuda" if device in ("cuda", "jetson") else "pytorch-cpu"
    missing = BACKENDS[backend].missing()
    if missing:
        raise UserError(f"{folder} is a PyTorch student and {missing}; load its export instead (edgedistill export)")
    runners = {}
    for encoder in ("image", "text"):
        art = {"name": f"{encoder}_fp32_pytorch", "encoder": encoder, "format": "pytorch", "precision": "fp32"}
        cand = next(c for c in candidates(art, folder, device, threads) if c.backend == backend)
        runners[encoder] = cand.make()  # type: ignore[misc]
    info = EncoderInfo(source, device, {"artifact": "image_fp32_pytorch", "path": str(folder), "backend": backend,
                                        "precision": "fp32", "format": "pytorch"},
                       {"artifact": "text_fp32_pytorch", "path": str(folder), "backend": backend,
                        "precision": "fp32", "format": "pytorch"}, "request",
                       cfg.edgedistill.weights_sha256 if cfg.edgedistill else None)
    return Encoder(runners["image"], runners["text"], preprocess, resolve(FORMATS["pytorch"].tokenizer)(folder),
                   cfg.model_cfg.embed_dim, info)
