"""Layerwise (hidden-state) distillation: student modules matched to teacher layers (OPTIMA-style, a reconstruction:
docs/methods.md#layerwise-distillation).

The student's vision trunk (timm, inside open_clip's ``TimmModel``) is split into modules: its stages (timm's
``feature_info``: the ends of the CNN stages, stem left out), or, where there are more stage points than
``num_modules`` (a ViT: one per block), runs of consecutive blocks. Module i ends at a hooked trunk submodule and
is mapped to one teacher layer (``teacher_layers``; by default the uniform map ``round((i + 1) L / M) - 1`` of M
modules onto L teacher blocks, so the last module meets the last block).

The hidden-state loss of a module: both maps are average-pooled to a common ``g x g`` grid
(``g = min(grid, student side, teacher side)``); the teacher's patch tokens (class token dropped) are
layer-normalised without affine parameters (``normalize_teacher``), so every layer's target has one scale; the
student's channels go through a learned linear projection (a 1 x 1 convolution) to the teacher's width; the loss
is the mean squared error over batch, grid cells and channels.

The projections train with the student (optimizer, checkpoint) but are not part of the saved open_clip student.
The teacher's hidden states come from forward hooks on ``model.visual.transformer.resblocks[i]`` of an open_clip
ViT, in the same teacher forward that gives its output embedding (``train.teacher: online``; hidden states are
too large to cache). The teacher sees the clean view and the student its augmented view, as for every term, so
the spatial match is only as close as the augmentation allows (keep ``data.augment`` mild; scenes recipes do).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgedistill.core.errors import UserError
from edgedistill.distill.recipe import LayerwiseConfig


@dataclass
class ModuleSpec:
    """One student module: where it ends, how its output looks, and the teacher layer it is matched to."""
    name: str              # the hooked trunk submodule (a timm module path, e.g. 'blocks.3')
    channels: int          # C of its output
    side: tuple[int, int]  # (h, w) of its output map
    layout: str            # 'nchw', 'nhwc' or 'tokens' (B, N, C) with ``prefix`` leading non-patch tokens
    prefix: int
    teacher_layer: int     # index into the teacher's resblocks (non-negative)
    grid: int              # g of the common pooled grid


def _stage_points(trunk: nn.Module) -> list[dict[str, Any]]:
    info = getattr(trunk, "feature_info", None)
    if info is None:
        return []
    points = [dict(f) for f in (info.info if hasattr(info, "info") else info)]
    staged = [p for p in points if p.get("reduction", 1) >= 4]  # leave the stem out
    return staged or points


def default_module_names(trunk: nn.Module, num_modules: int) -> list[str]:
    """The trunk submodules that end the modules: timm's stage points, grouped into at most ``num_modules`` runs."""
    points = _stage_points(trunk)
    if not points:
        raise UserError("loss.layerwise: the student's vision trunk has no timm feature_info to find its stages; "
                        "name them with loss.layerwise.student_modules")
    p = len(points)
    if p <= num_modules:
        return [pt["module"] for pt in points]
    ends = sorted({max(0, round((i + 1) * p / num_modules) - 1) for i in range(num_modules)})
    return [points[e]["module"] for e in ends]


def uniform_layer_map(num_modules: int, teacher_layers: int) -> list[int]:
    """Module i of M -> teacher block ``round((i + 1) L / M) - 1`` (the last module -> the last block)."""
    return [min(teacher_layers - 1, max(0, round((i + 1) * teacher_layers / num_modules) - 1))
            for i in range(num_modules)]


def teacher_blocks(teacher_model: nn.Module) -> tuple[nn.ModuleList, bool, tuple[int, int], int]:
    """(resblocks, batch_first, patch grid, width) of an open_clip ViT image tower; UserError for other towers."""
    visual = getattr(teacher_model, "visual", None)
    transformer = getattr(visual, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if not isinstance(blocks, nn.ModuleList) or not hasattr(visual, "grid_size"):
        raise UserError(f"loss.layerwise needs an open_clip ViT teacher (visual.transformer.resblocks); this "
                        f"teacher's image tower is {type(visual).__name__}. Turn loss.layerwise off")
    grid = tuple(int(g) for g in visual.grid_size)
    return blocks, bool(getattr(transformer, "batch_first", True)), grid, int(transformer.width)  # type: ignore


@contextlib.contextmanager
def capture(modules: dict[int, nn.Module], store: dict[int, Tensor]) -> Iterator[dict[int, Tensor]]:
    """Forward hooks that put each module's latest output into ``store[key]`` while the block runs."""
    handles = [m.register_forward_hook(lambda _m, _i, out, k=k: store.__setitem__(k, out[0] if isinstance(
        out, tuple) else out)) for k, m in modules.items()]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _to_map(x: Tensor, spec: ModuleSpec) -> Tensor:
    """A student module's output -> (B, C, h, w) float."""
    if spec.layout == "tokens":
        x = x[:, spec.prefix:]
        return x.reshape(x.shape[0], spec.side[0], spec.side[1], x.shape[-1]).permute(0, 3, 1, 2).float()
    if spec.layout == "nhwc":
        return x.permute(0, 3, 1, 2).float()
    return x.float()


def pool_tokens(m: Tensor, g: int) -> Tensor:
    """(B, C, h, w) -> (B, g * g, C) by adaptive average pooling."""
    return F.adaptive_avg_pool2d(m, g).flatten(2).transpose(1, 2)


class Layerwise(nn.Module):
    """Student modules, teacher layers, the learned projections, and the hidden-state loss of each module.

    ``student_outputs`` fills while ``capturing`` is on (hooks stay on the student trunk for the whole run and do
    nothing otherwise). ``teacher_targets(teacher, images)`` runs the teacher once and returns its embeddings
    (B, D) and each module's pooled, normalised target (B, g * g, D_t).
    """

    def __init__(self, config: LayerwiseConfig, student_model: nn.Module, teacher_model: nn.Module,
                 image_size: int) -> None:
        super().__init__()
        self.config = config
        trunk = getattr(student_model.visual, "trunk", None)
        if trunk is None:
            raise UserError("loss.layerwise needs a timm student vision tower (student.vision: a timm model)")
        blocks, self._batch_first, t_grid, t_width = teacher_blocks(teacher_model)
        self._blocks = list(blocks)  # a plain list: the teacher's blocks must not become submodules of this one
        names = list(config.student_modules) if config.student_modules else \
            default_module_names(trunk, config.num_modules)
        modules: dict[int, nn.Module] = {}
        for i, name in enumerate(names):
            try:
                modules[i] = trunk.get_submodule(name)
            except AttributeError:
                raise UserError(f"loss.layerwise.student_modules: the student trunk has no module '{name}'") from None
        n_layers = len(self._blocks)
        if config.teacher_layers is not None:
            if len(config.teacher_layers) != len(names):
                raise UserError(f"loss.layerwise.teacher_layers gives {len(config.teacher_layers)} layers for "
                                f"{len(names)} student modules ({', '.join(names)}); give one per module")
            bad = [t for t in config.teacher_layers if not -n_layers <= t < n_layers]
            if bad:
                raise UserError(f"loss.layerwise.teacher_layers: {bad[0]} is not a block of the teacher, which has "
                                f"{n_layers} (0..{n_layers - 1}, or negative from the end)")
            layers = [t % n_layers for t in config.teacher_layers]
        else:
            layers = uniform_layer_map(len(names), n_layers)
        self._student_modules = modules
        self.student_outputs: dict[int, Tensor] = {}
        self.capturing = False
        self.specs = self._probe(student_model, trunk, names, layers, image_size, t_grid)
        self.teacher_grid, self.teacher_width = t_grid, t_width
        self.projections = nn.ModuleList([nn.Linear(s.channels, t_width) for s in self.specs])
        for i, m in modules.items():
            m.register_forward_hook(self._student_hook(i))

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def term_name(self, i: int) -> str:
        return f"layerwise:{self.specs[i].name}"

    def _student_hook(self, i: int) -> Any:
        def hook(_m: nn.Module, _inputs: Any, out: Any) -> None:
            if self.capturing:
                self.student_outputs[i] = out[0] if isinstance(out, tuple) else out
        return hook

    @torch.no_grad()
    def _probe(self, model: nn.Module, trunk: nn.Module, names: list[str], layers: list[int], size: int,
               t_grid: tuple[int, int]) -> list[ModuleSpec]:
        """One forward of a blank image (eval mode) to learn each module's output shape."""
        store: dict[int, Tensor] = {}
        was = model.training
        model.eval()
        try:
            dev = next(model.visual.parameters()).device
            with capture(self._student_modules, store):
                model.encode_image(torch.zeros(1, 3, size, size, device=dev))
        finally:
            model.train(was)
        chans = {p["module"]: int(p["num_chs"]) for p in _stage_points(trunk)}
        prefix_tokens = int(getattr(trunk, "num_prefix_tokens", 0) or 0)
        specs = []
        for i, name in enumerate(names):
            out = store[i]
            if out.ndim == 4:
                nhwc = name in chans and out.shape[-1] == chans[name] and out.shape[1] != chans[name]
                c, h, w = (out.shape[3], out.shape[1], out.shape[2]) if nhwc else out.shape[1:]
                layout, prefix = ("nhwc" if nhwc else "nchw"), 0
            elif out.ndim == 3:
                n, c = out.shape[1], out.shape[2]
                side = int(round((n - prefix_tokens) ** 0.5))
                if side * side != n - prefix_tokens:
                    raise UserError(f"loss.layerwise: cannot read student module '{name}' output of {n} tokens as a "
                                    f"square grid")
                h = w = side
                layout, prefix = "tokens", prefix_tokens
            else:
                raise UserError(f"loss.layerwise: student module '{name}' gives a {out.ndim}-d output; pick "
                                f"modules with feature maps (B, C, H, W) or tokens (B, N, C)")
            g = max(1, min(self.config.grid, h, w, *t_grid))
            specs.append(ModuleSpec(name, int(c), (int(h), int(w)), layout, prefix, layers[i], g))
        return specs

    # ------------------------------------------------------------------------------------------ teacher

    def teacher_targets(self, teacher: Any, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Teacher embeddings (B, D) of ``images`` and every module's target (B, g_i * g_i, D_t), float32."""
        wanted = {i: self._blocks[s.teacher_layer] for i, s in enumerate(self.specs)}
        store: dict[int, Tensor] = {}
        with capture(wanted, store):
            emb = teacher.embed_images(images)
        gh, gw = self.teacher_grid
        targets = []
        for i, spec in enumerate(self.specs):
            x = store[i].clone().float()  # out of inference mode
            if not self._batch_first:
                x = x.transpose(0, 1)                                  # (N, B, D) -> (B, N, D)
            x = x[:, x.shape[1] - gh * gw:]                            # patch tokens (class token dropped)
            m = x.reshape(x.shape[0], gh, gw, x.shape[-1]).permute(0, 3, 1, 2)
            t = pool_tokens(m, spec.grid)
            if self.config.normalize_teacher:
                t = F.layer_norm(t, (t.shape[-1],))
            targets.append(t)
        return emb.clone(), targets

    # ------------------------------------------------------------------------------------------ student

    def student_tokens(self, i: int) -> Tensor:
        """Module i's captured output, pooled and projected -> (B, g_i * g_i, D_t) with gradient."""
        spec = self.specs[i]
        return self.projections[i](pool_tokens(_to_map(self.student_outputs[i], spec), spec.grid))

    @staticmethod
    def mse(student: Tensor, target: Tensor) -> Tensor:
        """Mean squared error over batch, grid cells and channels."""
        return (student - target.detach().to(student.dtype)).pow(2).mean()

    @torch.no_grad()
    def held_loss(self, model: nn.Module, projection: nn.Module | None, held: "HeldBatch",
                  amp_dtype: torch.dtype | None) -> float:
        """The distillation loss on the held batch, in eval mode: the mean hidden-state MSE over every module plus
        the squared distance of the normalised output embeddings (the reward's measure, docs/methods.md#optima)."""
        was = model.training
        model.eval()
        self.capturing = True
        try:
            dev = held.views.device
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                s_img = model.encode_image(held.views)
            s_img = s_img.float()
            if projection is not None:
                s_img = projection(s_img)
            hidden = torch.stack([self.mse(self.student_tokens(i).float(), held.targets[i])
                                  for i in range(len(self.specs))])
            out = (F.normalize(s_img, dim=-1) - F.normalize(held.teacher_image, dim=-1)).pow(2).sum(-1).mean()
            return float(hidden.mean() + out)
        finally:
            self.capturing = False
            self.student_outputs.clear()
            model.train(was)


@dataclass
class HeldBatch:
    """The fixed batch a selector's reward is measured on: clean student views, the teacher's embeddings and its
    per-module targets, all on the training device."""
    views: Tensor                  # (H, 3, S, S) channels_last
    teacher_image: Tensor          # (H, D)
    targets: list[Tensor]          # per module (H, g * g, D_t)


__all__ = ["HeldBatch", "Layerwise", "ModuleSpec", "capture", "default_module_names", "pool_tokens", "teacher_blocks",
           "uniform_layer_map"]
