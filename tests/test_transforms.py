"""Training views (data/transforms.py): render_view gives torchvision's bytes for any view, filter and size."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from edgedistill.data.transforms import Render, View, render_view, seeded_view

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def torchvision_render(image: Image.Image, view: View, render: Render) -> torch.Tensor:
    """The reference: torchvision's own functions, as RandomResizedCrop + RandomHorizontalFlip + ToTensor +
    Normalize apply them."""
    mode = TF.InterpolationMode(render.interpolation)
    crop = TF.resized_crop(image, view.top, view.left, view.height, view.width, [render.size, render.size], mode)
    if view.flip:
        crop = TF.hflip(crop)
    return TF.normalize(TF.to_tensor(crop), list(render.mean), list(render.std))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize("size", [16, 32, 96])  # down- and upsampling
def test_render_view_is_torchvisions_bytes(interpolation, size):
    rng = np.random.default_rng(size)
    image = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))  # not square: W 64, H 48
    render = Render(size, CLIP_MEAN, CLIP_STD, interpolation)
    for seed in range(40):
        view = seeded_view(image, seed, (0.1, 1.0), hflip=True)
        ours, reference = render_view(image, view, render), torchvision_render(image, view, render)
        assert ours.dtype == torch.float32 and ours.shape == (3, size, size)
        assert torch.equal(ours, reference), (seed, view)


def test_render_view_flips_and_crops_where_the_view_says():
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[:, :4, 0] = 255  # left half red
    image = Image.fromarray(pixels)
    render = Render(4, (0.0,) * 3, (1.0,) * 3, "nearest")
    plain = render_view(image, View(0, 0, 8, 8, False), render)
    flipped = render_view(image, View(0, 0, 8, 8, True), render)
    assert plain[0, :, :2].min() == 1.0 and plain[0, :, 2:].max() == 0.0
    assert torch.equal(flipped, plain.flip(-1))
    assert float(render_view(image, View(0, 4, 8, 4, False), render)[0].max()) == 0.0  # the right half: no red
