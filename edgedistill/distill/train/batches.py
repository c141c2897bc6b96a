"""What a training step is fed: images by index (seeded augmentation), epoch batches, the teacher's embeddings,
and each rank's share of a batch with the bookkeeping of the whole batch.

Resuming is exact because every random choice here is a function of (seed, epoch, index) or (seed, step): the
batch order of an epoch, each image's augmentation, each step's caption draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

import edgedistill.distill.distributed as distributed
from edgedistill.distill.cache import FeatureCache
from edgedistill.data.images import DecodedImages, open_image, why_unreadable
from edgedistill.data.transforms import Render, View, render_view, seeded_view
from edgedistill.data.manifest import Manifest
from edgedistill.core.hashing import seed_of
from edgedistill.distill.layerwise import Layerwise
from edgedistill.distill.teachers import Teacher
from edgedistill.distill.views import ReinforcedViews


class TrainImages(torch.utils.data.Dataset):
    """Training images by manifest index -> (index, student view, teacher view or None, stored view k or -1,
    reason or None).

    Each image's view in an epoch is a function of (seed, epoch, index), so workers, resume and batch order do not
    change what a given image looks like in a given epoch. ``teacher``: a ``Render`` draws the teacher's input from
    the very view the student sees (an online consistent teacher), a callable is the teacher's clean preprocessing
    (an online fixed teacher), None: the targets come from a cache. ``stored`` (N, K, 5): the reinforced cache's
    views; the epoch's view is one of them, k drawn from (seed, epoch, index). ``decoded``: the images already
    decoded in memory (``data.in_memory``), read instead of the files.
    """

    def __init__(self, paths: list[Path], student: Render, seed: int, scale: tuple[float, float] = (0.5, 1.0),
                 hflip: bool = True, teacher: Render | Callable | None = None,
                 stored: np.ndarray | None = None, decoded: DecodedImages | None = None) -> None:
        self.paths, self.student, self.seed, self.scale, self.hflip = paths, student, seed, scale, hflip
        self.teacher, self.stored, self.decoded = teacher, stored, decoded
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths)

    def view_of(self, index: int, image: Image.Image) -> tuple[View, int]:
        """The epoch's view of image ``index`` and which stored view it is (-1: drawn, not stored)."""
        seed = seed_of(self.seed, self.epoch, index)
        if self.stored is None:
            return seeded_view(image, seed, self.scale, self.hflip), -1
        k = int(np.random.default_rng(seed).integers(self.stored.shape[1]))
        return View.from_row(self.stored[index, k]), k

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, torch.Tensor | None, int, str | None]:
        try:
            image = self.decoded[index] if self.decoded is not None else open_image(self.paths[index])
            view, k = self.view_of(index, image)
            student = render_view(image, view, self.student)
            if isinstance(self.teacher, Render):
                teacher = render_view(image, view, self.teacher)
            else:
                teacher = self.teacher(image) if self.teacher is not None else None
            return index, student, teacher, k, None
        except Exception as e:  # counted by BadImages in the trainer
            return index, None, None, -1, why_unreadable(e)


@dataclass
class LoaderBatch:
    """What the data loader hands the trainer: the readable images of a batch and the unreadable ones."""
    indices: torch.Tensor                 # (B,) manifest indices
    views: torch.Tensor | None            # (B, 3, H, W) student views; None when none was readable
    teacher_views: torch.Tensor | None    # (B, 3, S, S) the teacher's input (an online teacher)
    stored: torch.Tensor                  # (B,) which stored view each image shows (-1: none)
    failed: list                          # [(index, reason)]


def collate_train(items: list) -> LoaderBatch:
    good = [it for it in items if it[1] is not None]
    return LoaderBatch(
        indices=torch.tensor([it[0] for it in good], dtype=torch.long),
        views=torch.stack([it[1] for it in good]) if good else None,
        teacher_views=torch.stack([it[2] for it in good]) if good and good[0][2] is not None else None,
        stored=torch.tensor([it[3] for it in good], dtype=torch.long),
        failed=[(it[0], it[4]) for it in items if it[1] is None])


class EpochBatches(torch.utils.data.Sampler):
    """Batches of an epoch: a permutation seeded by (seed, epoch), optionally starting at a given batch.

    ``batch_size`` is the global batch. With ``world_size`` > 1 each rank takes its contiguous slice of every
    batch; the slices of all ranks, in rank order, are the batch one process takes, so the run does not depend
    on the number of processes.
    """

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices, self.batch_size, self.seed = indices, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.drop_last = len(indices) >= batch_size  # in-batch terms need full batches; tiny sets keep one
        self.epoch, self.start = 0, 0

    @property
    def per_epoch(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.per_epoch - self.start

    def __iter__(self) -> Iterator[list[int]]:
        perm = np.random.default_rng(seed_of(self.seed, self.epoch)).permutation(self.indices)
        for b in range(self.start, self.per_epoch):
            batch = perm[b * self.batch_size:(b + 1) * self.batch_size]
            yield np.array_split(batch, self.world_size)[self.rank].tolist()


class TeacherFeatures:
    """The teacher's embeddings of a batch: looked up in the cache, or computed online."""

    def __init__(self, teacher: Teacher, cache: FeatureCache | None, views: ReinforcedViews | None = None) -> None:
        self.teacher, self.cache, self.views = teacher, cache, views

    def images(self, indices: torch.Tensor, teacher_views: torch.Tensor | None,
               stored: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D): the stored views' embeddings (a reinforced cache), the clean ones, or the teacher run now."""
        if self.cache is not None and self.views is not None:
            if stored is None or bool((stored < 0).any()):
                raise RuntimeError("a reinforced cache needs the stored view of every image of the batch")
            return self.views.features(indices, stored).float()
        if self.cache is not None:
            return self.cache.image_features(indices).float()
        if teacher_views is None:
            raise RuntimeError("an online teacher needs the teacher views of the batch")
        return self.teacher.embed_images(teacher_views).float()

    def texts(self, rows: np.ndarray, captions: list[str]) -> torch.Tensor:
        if self.cache is not None:
            return self.cache.text_features(rows).float()
        return self.teacher.embed_texts(captions).float()


@dataclass
class RankBatch:
    """What one rank feeds a step: its own images and captions, and what it needs of the whole batch."""
    step: int
    views: torch.Tensor                  # (b, 3, H, W) this rank's student views
    texts: list[str]                     # this rank's drawn captions (read by a student text tower)
    teacher_image: torch.Tensor          # (B, D) teacher embeddings of the whole batch's images
    teacher_text: torch.Tensor | None    # (P, D) ... of the whole batch's drawn captions; None without captions
    pair_image: torch.Tensor | None      # (P,) which of the B images each caption belongs to
    image_sizes: list[int]               # images of each rank (sum B)
    text_sizes: list[int]                # drawn captions of each rank (sum P)
    labels: torch.Tensor | None = None   # (B,) class index of each image, -1 = none; None without class texts
    arms: list[int] = field(default_factory=list)        # layerwise: the modules whose hidden-state terms are on
    hidden: list[torch.Tensor | None] | None = None      # layerwise: (B, g*g, D_t) teacher targets per module


@dataclass
class CaptionDraw:
    rows: np.ndarray        # (P,) caption rows in the manifest (and the cache)
    positions: np.ndarray   # (P,) position in the batch of each caption's image
    texts: list[str]


class BatchAssembler:
    """A loader batch -> this rank's RankBatch (None when the batch is too small to step on).

    The caption draw is made for the whole batch (the indices of all ranks, in rank order), so it is the draw one
    process makes; each rank then embeds its own captions, and the teacher's embeddings of all ranks are gathered.
    """

    def __init__(self, seed: int, manifest: Manifest, features: TeacherFeatures, device: torch.device,
                 labels: np.ndarray | None, layerwise: Layerwise | None) -> None:
        self.seed, self.features, self.device = seed, features, device
        self.captions, self.offsets = manifest.all_captions(), manifest.caption_offsets
        self.labels, self.layerwise = labels, layerwise
        self.batch_images = 0  # images of the latest batch, all ranks together

    def draw(self, indices: torch.Tensor, step: int) -> CaptionDraw:
        """One caption per captioned image of the batch, drawn from (seed, step)."""
        rng = np.random.default_rng(seed_of(self.seed, 7919, step))
        rows, positions = [], []
        for pos, i in enumerate(indices.tolist()):
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            if hi > lo:
                rows.append(int(rng.integers(lo, hi)))
                positions.append(pos)
        return CaptionDraw(np.asarray(rows, dtype=np.int64), np.asarray(positions, dtype=np.int64),
                           [self.captions[r] for r in rows])

    def __call__(self, step: int, batch: LoaderBatch, arms: list[int]) -> RankBatch | None:
        indices, views, teacher_views = batch.indices, batch.views, batch.teacher_views
        rank = distributed.current().rank
        sizes = distributed.gather_sizes(len(indices))
        self.batch_images = sum(sizes)
        if sum(sizes) < 2 or min(sizes) == 0 or views is None:  # in-batch terms need 2 images
            return None
        everyone = distributed.all_gather_rows(indices, sizes)
        draw = self.draw(everyone, step)
        bounds = np.cumsum([0, *sizes])
        text_sizes = [int(((draw.positions >= a) & (draw.positions < b)).sum())
                      for a, b in zip(bounds[:-1], bounds[1:])]
        mine = np.flatnonzero((draw.positions >= bounds[rank]) & (draw.positions < bounds[rank + 1]))
        my_texts = [draw.texts[i] for i in mine]
        with torch.no_grad():
            t_img, hidden = self._teacher_images(indices, teacher_views, batch.stored, sizes, arms)
            t_txt = self._teacher_texts(draw, mine, my_texts, text_sizes) if len(draw.rows) else None
        dev = self.device
        return RankBatch(
            step=step, views=views.to(dev, non_blocking=True, memory_format=torch.channels_last),
            texts=my_texts, teacher_image=t_img, teacher_text=t_txt,
            pair_image=torch.from_numpy(draw.positions).to(dev) if t_txt is not None else None,
            image_sizes=sizes, text_sizes=text_sizes,
            labels=torch.from_numpy(self.labels[everyone.cpu().numpy()]).to(dev) if self.labels is not None else None,
            arms=list(arms), hidden=hidden)

    def _teacher_images(self, indices: torch.Tensor, teacher_views: torch.Tensor | None, stored: torch.Tensor,
                        sizes: list[int], arms: list[int]) -> tuple[torch.Tensor, list[torch.Tensor | None] | None]:
        """(B, D) teacher embeddings of the whole batch, and the on modules' hidden-state targets (layerwise)."""
        dev = self.device
        if self.layerwise is None or not arms:
            local = self.features.images(indices, teacher_views, stored).to(dev)
            return distributed.all_gather_rows(local, sizes), None
        if teacher_views is None:
            raise RuntimeError("layerwise distillation runs the teacher online and needs the teacher views")
        local, targets = self.layerwise.teacher_targets(self.features.teacher, teacher_views.to(dev, non_blocking=True))
        hidden = [distributed.all_gather_rows(t.flatten(1), sizes).view(-1, *t.shape[1:]) if i in arms else None
                  for i, t in enumerate(targets)]
        return distributed.all_gather_rows(local.to(dev), sizes), hidden

    def _teacher_texts(self, draw: CaptionDraw, mine: np.ndarray, my_texts: list[str],
                       text_sizes: list[int]) -> torch.Tensor:
        """(P, D) teacher embeddings of the whole batch's drawn captions (each rank embeds its own)."""
        dev = self.device
        local = self.features.texts(draw.rows[mine], my_texts).to(dev) if len(mine) else \
            torch.zeros(0, self.features.teacher.embed_dim, device=dev)
        return distributed.all_gather_rows(local, text_sizes)


__all__ = ["BatchAssembler", "CaptionDraw", "EpochBatches", "LoaderBatch", "RankBatch", "TeacherFeatures", "TrainImages",
           "collate_train"]
