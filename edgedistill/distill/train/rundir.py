"""The run directory of a distill run: its paths, the checks before it is (re)used, checkpoints, and the log.

    <out>/recipe.yaml          the resolved recipe (every default filled in)
    <out>/checkpoints/last.pt  the newest checkpoint (written atomically: always complete)
    <out>/checkpoints/best.pt  the model of the best val evaluation
    <out>/metrics.jsonl        one JSON record per log step, evaluation and pull
    <out>/tensorboard/         the same scalars for TensorBoard
    <out>/student/             the saved open_clip student
    <out>/summary.json         written at the end

In a distributed run only rank 0 writes here; every rank reads the checkpoint on ``--resume``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import edgedistill.core.atomic as atomic
from edgedistill.core.errors import UserError
from edgedistill.distill.recipe import Recipe, read_yaml, save_recipe, validate_recipe

CHECKPOINT_FORMAT = 1
# Recipe keys that may change between a run and its resume (they do not change what is computed).
RESUMABLE_CHANGES = {"train.epochs", "train.max_steps", "train.log_every", "train.eval_every",
                     "train.checkpoint_every", "train.tensorboard", "data.workers", "device", "cache.dir",
                     "eval.batch_size"}


@dataclass
class RunDir:
    out: Path

    @property
    def checkpoints(self) -> Path: return self.out / "checkpoints"
    @property
    def last(self) -> Path: return self.checkpoints / "last.pt"
    @property
    def best(self) -> Path: return self.checkpoints / "best.pt"
    @property
    def student(self) -> Path: return self.out / "student"
    @property
    def metrics(self) -> Path: return self.out / "metrics.jsonl"
    @property
    def summary(self) -> Path: return self.out / "summary.json"
    @property
    def recipe(self) -> Path: return self.out / "recipe.yaml"
    @property
    def tensorboard(self) -> Path: return self.out / "tensorboard"

    # ------------------------------------------------------------------------------------------ checks

    def refuse_existing(self, resume: bool) -> None:
        if self.last.exists() and not resume:
            raise UserError(f"{self.out} already holds a run (checkpoints/last.pt); add --resume to continue it, "
                            f"or set out=... for a new run")

    def will_resume(self, recipe: Recipe, resume: bool) -> bool:
        """Whether this start continues a checkpoint (``--resume`` with one there); refuses a changed recipe."""
        if not resume or not self.last.exists():
            return False
        changed = recipe_differences(self._saved_recipe(), recipe.model_dump(mode="json"))
        if changed:
            raise UserError(f"--resume: the recipe changed since the run started ({', '.join(changed[:3])}); "
                            f"resume with the recipe in {self.recipe}, or start a new run with out=...")
        return True

    def _saved_recipe(self) -> dict[str, Any]:
        """The run's recipe as this version resolves it (so a renamed key of an older version is no change)."""
        raw = read_yaml(self.recipe, "run recipe") if self.recipe.exists() else {}
        try:
            return validate_recipe(raw, "run recipe").model_dump(mode="json")
        except UserError:
            return raw or {}

    def start(self, recipe: Recipe, resumed: bool) -> None:
        """Rank 0: a fresh run drops an old log; the resolved recipe is (re)written."""
        if not resumed:
            self.metrics.unlink(missing_ok=True)
        save_recipe(recipe, self.recipe)

    # ------------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: Path, payload: dict[str, Any]) -> None:
        with atomic.atomic_path(path) as tmp:
            torch.save({"format": CHECKPOINT_FORMAT, **payload}, tmp)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged file: one line, and how to get past it
            raise UserError(f"--resume: cannot read {path} ({str(e).splitlines()[0][:120]}); "
                            "delete it to restart the run") from e

    # ------------------------------------------------------------------------------------------ log

    def truncate_log(self, step: int) -> None:
        """Drop log lines written after the checkpoint at ``step`` (their steps run again)."""
        if not self.metrics.exists():
            return
        kept = []
        for line in self.metrics.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
        atomic.write_text(self.metrics, "".join(k + "\n" for k in kept))


class MetricsLog:
    """metrics.jsonl plus TensorBoard (optional) of one run; a no-op on ranks other than 0."""

    def __init__(self, run: RunDir, enabled: bool, tensorboard: bool, first_step: int) -> None:
        self.run, self.enabled = run, enabled
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # deferred: pulls in tensorboard's stack

            self.tb = SummaryWriter(str(run.tensorboard), purge_step=first_step)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.run.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in _flatten(record).items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def recipe_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved recipes, except those a resume may change."""
    keys = []
    for k in sorted(set(old) | set(new)):
        path = f"{prefix}{k}"
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict) and not path.startswith("loss.terms"):
            keys += recipe_differences(a, b, path + ".")
        elif a != b and path not in RESUMABLE_CHANGES:
            keys.append(path)
    return keys


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out
