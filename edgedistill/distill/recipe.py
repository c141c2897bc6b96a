"""Recipes: one YAML file is one experiment, validated by pydantic.

Unknown keys and wrong types are user errors naming the key's full path and the nearest valid key.
Command-line overrides ``key.sub=value`` are applied to the raw YAML before validation, so they are checked
exactly like the file. Relative paths in a recipe resolve against the current working directory (the
place the command runs from), like ``out: runs/<name>``.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, SerializeAsAny
from pydantic import ValidationError, field_validator, model_validator

import edgedistill.core.atomic as atomic
from edgedistill.distill.balance import BALANCERS, BalancerOptions, validate_balancer
from edgedistill.core.errors import UserError
from edgedistill.core.locations import cache_root
from edgedistill.distill.losses import TermOptions, validate_term_options
from edgedistill.distill.select import SelectorOptions, validate_selector
from edgedistill.evaluation.split import DEFAULT_DESCRIPTION_PROMPT, DEFAULT_PROMPT


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherConfig(_Section):
    model: str = Field(description="open_clip model name (ViT-B-32), path to an open_clip model config JSON, "
                                   "or hf-hub:org/name")
    pretrained: str | None = Field(None, description="open_clip pretrained tag, local checkpoint path, "
                                                     "or hf-hub:org/name; null = random weights")


class StudentTextConfig(_Section):
    width: PositiveInt = Field(256, description="student text transformer width")
    layers: PositiveInt = Field(4, description="student text transformer blocks")
    heads: PositiveInt = Field(4, description="attention heads (must divide width)")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "StudentTextConfig":
        if self.width % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide width ({self.width})")
        return self


class StudentConfig(_Section):
    vision: str = Field("mobilenetv3_large_100", description="timm model name of the student's vision tower")
    text: Literal["teacher"] | StudentTextConfig = Field(
        "teacher", description="'teacher': the teacher's text tower, frozen; or {width, layers, heads}: a smaller "
                               "open_clip text transformer distilled from the teacher's text embeddings")
    image_size: PositiveInt | None = Field(None, description="student input size; default: the teacher's")
    embed_dim: PositiveInt | None = Field(None, description="student embedding width; default: the teacher's. "
                                                            "Another width needs a student text tower")


class AugmentConfig(_Section):
    scale: tuple[float, float] = Field((0.5, 1.0), description="random resized crop area range")
    hflip: bool = Field(True, description="random horizontal flip (turn off when captions mention left/right)")

    @field_validator("scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] <= v[1] <= 1.0:
            raise ValueError("needs 0 < min <= max <= 1")
        return v


class DataConfig(_Section):
    train: Path = Field(description="training manifest (.jsonl or .csv), webdataset shards, or a folder of images")
    val: Path | None = Field(None, description="validation manifest (.jsonl or .csv), shards or a folder of images")
    image_root: Path | None = Field(None, description="folder for relative image paths; default: the manifest's")
    batch_size: PositiveInt = 64
    workers: NonNegativeInt = 2
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0,
                                    description="stop when more than this share of images cannot be read")
    in_memory: bool = Field(False, description="decode every training image once and keep its pixels in memory "
                                               "(small images on a CPU: no decode per step; refused above half "
                                               "the available memory)")
    augment: AugmentConfig = AugmentConfig()
    class_descriptions: Path | None = Field(
        None, description="JSON file: class name -> list of attribute sentences; each class's text becomes the mean "
                          "teacher embedding of description_prompt over its sentences (classes not in the file "
                          "keep eval.prompt)")
    description_prompt: str = Field(DEFAULT_DESCRIPTION_PROMPT,
                                    description="class prompt with a description; {label} and {description}")
    folder_labels: bool = Field(False, description="a folder given as a split: each image's first subfolder is "
                                                   "its label (the ImageFolder layout)")
    ood_val: Path | None = Field(None, description="manifest of out-of-distribution classes (disjoint from the "
                                                   "training classes) for zero-shot and few-shot evaluation")

    @field_validator("description_prompt")
    @classmethod
    def _has_placeholders(cls, v: str) -> str:
        if "{label}" not in v or "{description}" not in v:
            raise ValueError("the prompt needs {label} and {description} placeholders")
        return v


class CacheConfig(_Section):
    dir: Path | None = Field(None, description="teacher feature cache root; default: ~/.cache/edgedistill")
    chunk_size: PositiveInt = Field(1024, description="images per resumable chunk of the cache build")
    views: PositiveInt = Field(4, description="train.teacher_view consistent with a cached teacher: augmented views "
                                              "stored per image with the teacher's embedding of each")
    views_seed: NonNegativeInt = Field(0, description="seed of the stored views (independent of the training "
                                                      "seed, so runs with other seeds share the store)")

    @property
    def root(self) -> Path:
        """``dir``, or the default cache root ($EDGEDISTILL_CACHE, ~/.cache/edgedistill)."""
        return cache_root(self.dir)


# The recipe defaults of loss.terms and loss.balancer; to be chosen by the quality benchmark (benchmarks/README.md).
DEFAULT_TERMS = ["feature", "similarity", "relation", "contrastive", "hard_negative", "clip"]
DEFAULT_BALANCER = "coverage"  # benchmarks/README.md#ground-truth-quality-on-procedural-scenes-qualitypy


class LayerwiseConfig(_Section):
    weight: float = Field(1.0, ge=0.0, description="base weight of each module's hidden-state term")
    grid: PositiveInt = Field(4, description="pool student and teacher maps to a common g x g grid (at most the "
                                             "smaller map's side)")
    num_modules: PositiveInt = Field(4, description="at most this many student modules: timm's stage points, "
                                                    "grouped into runs of consecutive blocks when there are more")
    student_modules: list[str] | None = Field(None, description="trunk submodules that end the modules (timm "
                                                                "module paths, e.g. [blocks.1, blocks.3]); "
                                                                "default: from timm's feature_info")
    teacher_layers: list[int] | None = Field(None, description="teacher ViT block of each module (negative: from "
                                                               "the end); default: the uniform map")
    normalize_teacher: bool = Field(True, description="layer-normalise the teacher's tokens (no affine) before "
                                                      "the loss, so every layer's target has one scale")


class LossConfig(_Section):
    layerwise: LayerwiseConfig | None = Field(
        None, description="hidden-state distillation, module by module (true, or a mapping of its options); "
                          "needs train.teacher: online (set automatically when train.teacher is not given)")
    # The validated options objects of each component (a term's own Options subclass), read as such by the code;
    # SerializeAsAny: dumped with every option of that subclass, not just the base fields.
    terms: dict[str, SerializeAsAny[TermOptions]] = Field(
        default_factory=lambda: {t: validate_term_options(t, {}) for t in DEFAULT_TERMS},
        description="loss terms by name, each with its options ({} = defaults); a plain list of names also works")
    balancer: SerializeAsAny[BalancerOptions] = Field(default_factory=lambda: validate_balancer(DEFAULT_BALANCER),
                                                      description="balancer name, or {name: ..., options}")

    @field_validator("terms", mode="before")
    @classmethod
    def _terms(cls, v: Any) -> dict[str, TermOptions]:
        if isinstance(v, list):
            if not all(isinstance(t, str) for t in v):
                raise ValueError("a list of terms holds names only; give options as a mapping name: {options}")
            v = {t: {} for t in v}
        if not isinstance(v, dict) or not v:
            raise ValueError("name at least one loss term, as a list or a mapping name: {options}")
        return {str(name): validate_term_options(str(name), opts) for name, opts in v.items()}

    @field_validator("balancer", mode="before")
    @classmethod
    def _balancer(cls, v: Any) -> BalancerOptions:
        if not isinstance(v, (str, dict, BalancerOptions)):
            raise ValueError("give a balancer name or a mapping {name: ..., options}")
        return validate_balancer(v)

    @field_validator("layerwise", mode="before")
    @classmethod
    def _layerwise(cls, v: Any) -> Any:
        if v is True:
            return {}
        if v is False:
            return None
        return v

    @model_validator(mode="after")
    def _combine_parts(self) -> "LossConfig":
        """A term of parts left at ``combine: null`` counts its rows under a balancer that weighs terms by their
        samples (coverage: every row alike, docs/methods.md#coverage), else is the mean of its parts."""
        rows = BALANCERS.lookup(self.balancer.name).uses_counts
        for name, options in self.terms.items():
            if "combine" in type(options).model_fields and options.combine is None:  # type: ignore[attr-defined]
                self.terms[name] = options.model_copy(update={"combine": "rows" if rows else "parts"})
        return self


class TrainConfig(_Section):
    epochs: PositiveInt = 10
    max_steps: PositiveInt | None = Field(None, description="stop after this many steps (default: all epochs)")
    lr: PositiveFloat = Field(1e-3, description="peak AdamW learning rate")
    weight_decay: float = Field(0.05, ge=0.0, description="AdamW weight decay (not on biases, norms, logit scale)")
    warmup_steps: NonNegativeInt = Field(100, description="linear warm-up, then cosine decay to zero")
    grad_clip: float = Field(1.0, ge=0.0, description="clip the gradient norm to this; 0 = off")
    amp: bool = Field(True, description="mixed precision on CUDA (bf16 where supported, else fp16); CPU is fp32")
    teacher: Literal["cached", "online"] = Field(
        "cached", description="cached: teacher features from the feature cache; online: run the teacher every step")
    teacher_view: Literal["consistent", "clean"] = Field(
        "clean", description="consistent: the teacher's target is for the very view the student trains on (cached: "
                             "cache.views stored views; online: the teacher runs on the view); clean: the "
                             "teacher's embedding of the clean centre crop (a fixed teacher)")
    log_every: PositiveInt = Field(10, description="steps between log lines (metrics.jsonl, TensorBoard)")
    eval_every: NonNegativeInt = Field(0, description="steps between val evaluations; 0 = after each epoch")
    checkpoint_every: NonNegativeInt = Field(200, description="steps between checkpoints/last.pt; 0 = each epoch")
    tensorboard: bool = Field(True, description="also write TensorBoard logs to <out>/tensorboard")
    sync_batchnorm: bool = Field(True, description="distributed on GPUs: BatchNorm statistics over the global "
                                                   "batch (SyncBatchNorm), so the GPU count does not change the "
                                                   "result; CPU processes always use their own slice")


class EvalConfig(_Section):
    prompt: str = Field(DEFAULT_PROMPT, description="zero-shot class prompt; {label} is the class name")
    batch_size: PositiveInt = Field(128, description="images per batch when embedding val data")
    few_shot: list[PositiveInt] = Field([1, 4], description="data.ood_val few-shot: k support images per new class")
    few_shot_repeats: PositiveInt = Field(3, description="seeded support draws per k (the mean is reported)")
    tip_alpha: float = Field(1.0, ge=0.0, description="Tip-Adapter: weight of the support-cache logits")
    tip_beta: float = Field(5.5, gt=0.0, description="Tip-Adapter: sharpness of the support affinities")

    @field_validator("prompt")
    @classmethod
    def _has_label(cls, v: str) -> str:
        if "{label}" not in v:
            raise ValueError("the prompt needs a {label} placeholder")
        return v


class Recipe(_Section):
    name: str
    seed: int = 0
    out: Path | None = Field(None, description="run directory; default: runs/<name>")
    device: str = Field("auto", description="auto (CUDA when available), cpu, cuda or cuda:N")
    teacher: TeacherConfig
    student: StudentConfig = StudentConfig()
    data: DataConfig
    cache: CacheConfig = CacheConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    select: SerializeAsAny[SelectorOptions] | None = Field(
        None, description="module selection for loss.layerwise: a selector name (optima, thompson, random, uniform) "
                          "or {name: ..., options} ('method' is accepted for 'name'); default with layerwise: optima")

    @field_validator("select", mode="before")
    @classmethod
    def _select(cls, v: Any) -> SelectorOptions | None:
        if v is None:
            return None
        if not isinstance(v, (str, dict, SelectorOptions)):
            raise ValueError("give a selector name or a mapping {name: ..., options}")
        return validate_selector(v)

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError("a name starts with a letter or digit, followed by letters, digits, '_', '-' or '.'")
        return v

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError("use auto, cpu, cuda or cuda:N")
        return v

    @model_validator(mode="after")
    def _default_out(self) -> "Recipe":
        if self.student.embed_dim is not None and self.student.text == "teacher":
            # The teacher's text tower emits the teacher's width; both towers must share one space.
            raise ValueError("student.embed_dim needs a student text tower (student.text: {width, layers, heads}); "
                             "with student.text: teacher the student embeds at the teacher's width")
        if self.out is None:
            self.out = Path("runs") / self.name
        if self.loss.layerwise is not None:
            if self.train.teacher == "cached":
                if "teacher" in self.train.model_fields_set:
                    raise ValueError("loss.layerwise needs the teacher's hidden states, which are not cached: set "
                                     "train.teacher: online (or leave it out), or turn loss.layerwise off")
                self.train.teacher = "online"
            if self.select is None:
                self.select = validate_selector("optima")
        elif self.select is not None:
            raise ValueError("select chooses among the modules of loss.layerwise; add loss.layerwise: true or "
                             "remove select")
        return self


# ----------------------------------------------------------------------------------------------- errors


def _unwrap_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (``X``, ``X | None``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _unwrap_model(arg)
            if found is not None:
                return found
    return None


def _section_at(loc: Sequence[Any], root: type[BaseModel] | None = None) -> type[BaseModel] | None:
    model: type[BaseModel] | None = root or Recipe
    for part in loc:
        if model is None or part not in model.model_fields:
            return None
        model = _unwrap_model(model.model_fields[part].annotation)
    return model


def valid_keys(section: str = "") -> list[str]:
    """Field names of the recipe section at dotted path ``section`` ('' = top level)."""
    model = _section_at([p for p in section.split(".") if p])
    return list(model.model_fields) if model else []


def describe_error(error: dict[str, Any], root: type[BaseModel] | None = None) -> str:
    """One pydantic error of a ``root`` model (default Recipe) as a line naming the key and the nearest valid one."""
    loc = [p for p in error["loc"] if isinstance(p, str)]
    path = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        parent, key = loc[:-1], loc[-1]
        section = _section_at(parent, root)
        names = list(section.model_fields) if section else []
        prefix = ".".join(parent) + "." if parent else ""
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
        if close:
            return f"unknown key '{path}'; did you mean '{prefix}{close[0]}'?"
        return f"unknown key '{path}'; valid keys there: {', '.join(names)}"
    if error["type"] == "missing":
        return f"missing required key '{path}'"
    got = error.get("input")
    got_text = f" (got {got!r})" if not isinstance(got, (dict, list, BaseModel)) else ""
    msg = error["msg"].removeprefix("Value error, ")
    return f"'{path}': {msg}{got_text}" if path else f"{msg}{got_text}"


def validate_recipe(raw: Any, source: str = "recipe") -> Recipe:
    """Validate a raw mapping into a Recipe, or raise a one-line UserError naming the first problem."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a recipe is a YAML mapping of keys (name, teacher, data, ...), "
                        f"not a {type(raw).__name__}")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        errors = e.errors()
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise UserError(f"{source}: {describe_error(errors[0])}{more}") from e


# -------------------------------------------------------------------------------------------- overrides


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'train.epochs=3'`` -> (['train', 'epochs'], 3); the value is read as YAML (numbers, null, lists)."""
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in parts):
        raise UserError(f"override '{item}' is not of the form key.sub=value (e.g. train.epochs=3)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each ``key.sub=value`` in the raw recipe mapping (in place, and returned)."""
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"override '{item}': '{'.'.join(parts[:i + 1])}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


# ---------------------------------------------------------------------------------------- load and save


def read_yaml(path: Path, what: str = "recipe") -> Any:
    """Read YAML with ``safe_load`` (tags that would run code are refused), as a one-line error on failure."""
    if not path.is_file():
        raise UserError(f"{what} {path} not found; check the path")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not a UTF-8 text file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{what} {path} is not valid YAML{where}: {problem}") from e


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load, override and validate a recipe file."""
    path = Path(path)
    raw = read_yaml(path)
    if raw is None:
        raise UserError(f"recipe {path} is empty; see recipes/clip_to_mobilenet.yaml for an example")
    if isinstance(raw, dict):
        apply_overrides(raw, overrides)
    return validate_recipe(raw, source=f"recipe {path}")


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, default_flow_style=None)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe (every default filled in) atomically."""
    atomic.write_text(path, recipe_to_yaml(recipe))
