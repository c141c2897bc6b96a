"""Students are open_clip models: a timm vision tower plus the teacher's text tower (frozen) or a smaller one.

The student is described by an ordinary open_clip model config, so a distilled student loads with
``open_clip.create_model('local-dir:RUN/student')`` (or ``add_model_config`` + ``create_model``) and works with
the rest of the CLIP ecosystem. The timm tower uses timm's own classifier as the projection to the embedding
width (``timm_proj: ""``): open_clip's ``linear`` adapter sizes its layer from ``num_features``, which is not the
trunk's output width for MobileNetV3 (960 vs 1280), so the forward would fail.
"""

from __future__ import annotations

import copy
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import timm
import torch
from safetensors.torch import save_file

import edgedistill.core.atomic as atomic
from edgedistill.core.errors import UserError
from edgedistill.distill.recipe import StudentConfig, StudentTextConfig
from edgedistill.runtime.preprocess import image_side
from edgedistill.core.hashing import sha256_file, sha256_json
from edgedistill.distill.teachers import Teacher, quiet_open_clip, register_open_clip_config

# The towers the project tests and documents (any timm model name works; these are the edge-friendly ones).
STUDENT_ZOO: dict[str, str] = {
    "mobilenetv3_small_100": "1.5M parameters; the smallest, for Jetson Nano-class devices and CPUs",
    "mobilenetv3_large_100": "4.2M; the default edge student",
    "efficientnet_b0": "4.0M; more accurate than MobileNetV3 at a higher latency",
    "resnet18": "11M; plain convolutions, the easiest to quantise to INT8",
    "vit_tiny_patch16_224": "5.5M; a small ViT (224 px only)",
}

CONFIG_FILE = "open_clip_config.json"      # open_clip's hub / local-dir layout
WEIGHTS_FILE = "open_clip_model.safetensors"


@dataclass
class Student:
    """A student open_clip model with the config that rebuilds it."""
    model: open_clip.CLIP | open_clip.CustomTextCLIP
    name: str                       # the open_clip model name it is registered under
    config: dict[str, Any]          # open_clip model config (embed_dim, vision_cfg, text_cfg, ...)
    preprocess_cfg: dict[str, Any]  # image size, mean, std, interpolation, resize mode
    text_is_teacher: bool           # the text tower is the teacher's, frozen
    weights_sha256: str | None = None  # of the saved weights (a loaded student; the model's identity)

    @property
    def embed_dim(self) -> int:
        return int(self.config["embed_dim"])


def check_vision_tower(name: str, image_size: int | None = None) -> None:
    """UserError unless ``name`` is a timm model (that can run at ``image_size``, when given)."""
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"student.vision: unknown timm model '{name}'; {hint}tested students: "
                        f"{', '.join(STUDENT_ZOO)} (any name from timm.list_models() works)")
    cfg = timm.models.get_pretrained_cfg(name) or timm.models.get_pretrained_cfg(name + ".")
    native = getattr(cfg, "input_size", None) if cfg is not None else None
    if image_size and cfg is not None and getattr(cfg, "fixed_input_size", False) and native \
            and native[-1] != image_size:
        raise UserError(f"student.vision: {name} takes {native[-1]} px inputs only; set student.image_size: "
                        f"{native[-1]} or choose a convolutional tower ({', '.join(list(STUDENT_ZOO)[:4])})")


def _teacher_config(teacher: Teacher) -> dict[str, Any]:
    cfg = open_clip.get_model_config(teacher.source.model_name)
    if cfg is None:
        raise UserError(f"cannot read the open_clip config of teacher {teacher.source.model_name}")
    return copy.deepcopy(cfg)


def _uses_quick_gelu(model: torch.nn.Module) -> bool:
    # Pretrained OpenAI weights switch QuickGELU on at load time, so ask the built model, not the config.
    return any(isinstance(m, open_clip.transformer.QuickGELU) for m in model.modules())


def student_config(cfg: StudentConfig, teacher: Teacher) -> dict[str, Any]:
    """The open_clip model config of the student described by ``cfg`` for ``teacher``."""
    tcfg = _teacher_config(teacher)
    size = cfg.image_size or image_side(teacher.preprocess_cfg)
    check_vision_tower(cfg.vision, size)
    text_cfg = copy.deepcopy(tcfg["text_cfg"])
    embed_dim = teacher.embed_dim
    if isinstance(cfg.text, StudentTextConfig):
        if text_cfg.get("hf_model_name"):
            raise UserError("student.text: a student text transformer needs an open_clip text tower in the "
                            f"teacher; {teacher.source.model_name} uses {text_cfg['hf_model_name']}. "
                            "Use student.text: teacher")
        text_cfg.update(width=cfg.text.width, layers=cfg.text.layers, heads=cfg.text.heads)
        embed_dim = cfg.embed_dim or embed_dim
    config: dict[str, Any] = {
        "embed_dim": embed_dim,
        "quick_gelu": _uses_quick_gelu(teacher.model),
        "vision_cfg": {"timm_model_name": cfg.vision, "timm_model_pretrained": False, "timm_pool": "avg",
                       "timm_proj": "", "image_size": size},
        "text_cfg": text_cfg,
    }
    for key in ("custom_text", "init_logit_scale", "init_logit_bias"):
        if key in tcfg:
            config[key] = tcfg[key]
    return config


def build_student(cfg: StudentConfig, teacher: Teacher, name: str, seed: int = 0) -> Student:
    """A randomly initialised student; with ``text: teacher`` it holds a frozen copy of the teacher's text tower."""
    config = student_config(cfg, teacher)
    # open_clip's model-config registry is global: a name of its own per config, so two students built in one
    # process (two recipes with the same name, other towers) never take each other's entry.
    model_name = f"edgedistill-{name}-{sha256_json(config)[:10]}"
    register_open_clip_config(model_name, config)
    torch.manual_seed(seed)
    with quiet_open_clip():  # "initialized randomly" is the point here
        model = open_clip.create_model(model_name, device="cpu")
    text_is_teacher = not isinstance(cfg.text, StudentTextConfig)
    teacher_state = {k: v.detach().float().cpu() for k, v in teacher.model.state_dict().items()}
    with torch.no_grad():
        model.logit_scale.copy_(teacher_state["logit_scale"])
        if text_is_teacher:
            _copy_text_tower(model, teacher_state, teacher.source.model_name)
    preprocess = dict(teacher.preprocess_cfg)
    preprocess["size"] = config["vision_cfg"]["image_size"]
    return Student(model, model_name, config, preprocess, text_is_teacher)


def _copy_text_tower(model: torch.nn.Module, teacher_state: dict[str, torch.Tensor], teacher_name: str) -> None:
    student_state = model.state_dict()
    text_keys = [k for k in student_state if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")]
    missing = [k for k in text_keys if k not in teacher_state or teacher_state[k].shape != student_state[k].shape]
    if missing:
        raise UserError(f"cannot reuse the text tower of {teacher_name}: {len(missing)} tensors differ "
                        f"(first: {missing[0]})")
    for key in text_keys:
        student_state[key].copy_(teacher_state[key])
    for name, param in model.named_parameters():
        if name in text_keys:
            param.requires_grad_(False)


def save_student(student: Student, folder: Path, extra: dict[str, Any] | None = None) -> None:
    """Write the open_clip config and safetensors weights; the folder is replaced whole, never half-written.

    Layout: ``open_clip_config.json`` ({model_cfg, preprocess_cfg}: loads with ``local-dir:FOLDER``),
    ``open_clip_model.safetensors``, and ``<name>.json`` (the bare model config, for ``add_model_config``).
    """
    folder = Path(folder)
    with atomic.staging_dir(folder) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in student.model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        # export and eval check the weights against this before they use them (a damaged file is refused)
        (tmp / CONFIG_FILE).write_text(json.dumps({
            "model_cfg": student.config, "preprocess_cfg": student.preprocess_cfg,
            "edgedistill": {"name": student.name, "text_is_teacher": student.text_is_teacher,
                            "weights_sha256": sha256_file(tmp / WEIGHTS_FILE), **(extra or {})}}, indent=2))
        (tmp / f"{student.name}.json").write_text(json.dumps(student.config, indent=2))
        atomic.replace_dir(tmp, folder)


def load_student(folder: Path, device: str | torch.device = "cpu") -> Student:
    """Load a saved student folder back through open_clip's own loader."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"{folder} is not a saved student (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
                        "was the run finished?")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
        info = meta.get("edgedistill") or {}
        model_cfg, preprocess_cfg = meta["model_cfg"], meta["preprocess_cfg"]
        if not all(isinstance(x, dict) for x in (info, model_cfg, preprocess_cfg)):
            raise TypeError("model_cfg, preprocess_cfg and edgedistill must be objects")
        recorded = info.get("weights_sha256")
        if recorded is not None and not isinstance(recorded, str):
            raise TypeError("edgedistill.weights_sha256 must be a string")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{config_path} is not a student config ({type(e).__name__}: {e}); distill again") from None
    if recorded is not None and sha256_file(folder / WEIGHTS_FILE) != recorded:
        raise UserError(f"{folder / WEIGHTS_FILE} does not match the sha256 recorded when it was saved (damaged or "
                        f"changed); distill again, or restore the file")
    try:
        with quiet_open_clip():
            model = open_clip.create_model(f"local-dir:{folder}", device=device)
    except Exception as e:  # noqa: BLE001 - a damaged folder; say which, not where open_clip stumbled
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{folder} does not load as an open_clip student ({first}); distill again") from e
    model.eval()
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"{folder}: {len(bad)} weight tensors hold NaN or inf (first: {bad[0]}); the training "
                        f"diverged or the file is damaged: distill again")
    return Student(model, info.get("name", "edgedistill-student"), model_cfg, preprocess_cfg,
                   bool(info.get("text_is_teacher", False)), weights_sha256=recorded)
