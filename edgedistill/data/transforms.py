"""The student's training transform: the teacher's geometry and normalisation plus augmentation.

The teacher sees open_clip's own clean centre crop (from ``teachers.Teacher.preprocess``); the student sees
augmented views of the same image (random resized crop, optional horizontal flip), as in the OOD paper.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image
from torchvision import transforms as T


def student_train_transform(size: int | Sequence[int], mean: Sequence[float], std: Sequence[float],
                            scale: tuple[float, float] = (0.5, 1.0), hflip: bool = True
                            ) -> Callable[[Image.Image], torch.Tensor]:
    """Random resized crop to ``size`` (+ flip), to a normalised (3, H, W) float tensor."""
    steps: list[Callable] = [T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean=mean, std=std)]
    return T.Compose(steps)
