"""Rendering a scene to an RGB image: background, then each object, drawn supersampled and box-downscaled."""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from edgedistill.data.scenes.model import Background, Scene, SceneObject

# Geometry, in fractions of the image side. Corner centres at 0.215 keep two large objects (radius <= 0.16 * 1.12)
# with offsets <= 0.012 from touching the centre object along the diagonal, and every object inside the image.
_CORNER = 0.215
_POS_XY = {"top left": (_CORNER, _CORNER), "top right": (1 - _CORNER, _CORNER),
           "bottom left": (_CORNER, 1 - _CORNER), "bottom right": (1 - _CORNER, 1 - _CORNER), "center": (0.5, 0.5)}
_RADIUS = {"small": 0.10, "large": 0.16}  # circumradius; the 1.6 ratio survives +-12 % jitter (0.112 < 0.141)
_RING_WIDTH = 0.36  # of the radius


def _regular(n: int, radius: float = 1.0, start: float = -90.0) -> list[tuple[float, float]]:
    return [(radius * math.cos(math.radians(start + 360 * k / n)), radius * math.sin(math.radians(start + 360 * k / n)))
            for k in range(n)]


def _star() -> list[tuple[float, float]]:
    outer, inner = _regular(5), _regular(5, 0.45, -90 + 36)  # a fat inner radius stays a star at 6 px
    return [p for pair in zip(outer, inner) for p in pair]


_W, _L = 0.32, 0.95  # cross arm half-width and length (corner circumradius ~1)
# Unit polygons (circumradius <= 1, y down, pointing up) as (K, 2) arrays.
_POLYGONS = {name: np.array(points, dtype=np.float64) for name, points in {
    "square": [(-0.7, -0.7), (0.7, -0.7), (0.7, 0.7), (-0.7, 0.7)],
    "triangle": _regular(3),
    "star": _star(),
    "cross": [(-_W, -_L), (_W, -_L), (_W, -_W), (_L, -_W), (_L, _W), (_W, _W), (_W, _L), (-_W, _L), (-_W, _W),
              (-_L, _W), (-_L, -_W), (-_W, -_W)],
    "diamond": [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)],  # narrow: a rotated square is not a diamond
    "hexagon": _regular(6, start=0.0),
}.items()}

_NOISE_SIDE = 512  # backgrounds are made at the output size (<= 512), then upscaled for supersampling


@functools.lru_cache(maxsize=None)
def _noise_bank(sigma: float) -> Image.Image:
    """(512, 512) RGB Gaussian noise around 128, fixed; a scene crops it at its own offset (a C-speed crop)."""
    rng = np.random.default_rng([20240611, int(sigma * 100)])
    noise = rng.standard_normal((_NOISE_SIDE, _NOISE_SIDE, 3), dtype=np.float32) * sigma + 128
    return Image.fromarray(np.clip(np.rint(noise), 0, 255).astype(np.uint8), "RGB")


@functools.lru_cache(maxsize=256)
def _gradient_mask(side: int, angle: float) -> Image.Image:
    """(side, side) "L" ramp from 0 to 255 along ``angle`` degrees (x right, y down)."""
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    x = (np.arange(side, dtype=np.float64) + 0.5) / side
    t = x[None, :] * c + x[:, None] * s  # (side, side)
    lo, hi = min(0, c) + min(0, s), max(0, c) + max(0, s)
    return Image.fromarray(np.rint((t - lo) * (255 / (hi - lo))).astype(np.uint8), "L")


def _stripes(bg: Background, side: int) -> Image.Image:
    """Every other band of width ``period / 2`` in tone2, drawn as polygons (anti-aliased by the supersampling)."""
    img = Image.new("RGB", (side, side), bg.tone)
    draw = ImageDraw.Draw(img)
    c, s = math.cos(math.radians(bg.angle)), math.sin(math.radians(bg.angle))
    half = bg.period / 2
    reach = 0.75  # > half the diagonal: bands span the whole image
    first = math.floor(-reach / half - bg.phase) - 1
    for k in range(first, first + int(2 * reach / half) + 3):
        if k % 2:
            continue
        t0, t1 = (k + bg.phase) * half, (k + 1 + bg.phase) * half
        corners = [(t0, -reach), (t0, reach), (t1, reach), (t1, -reach)]
        draw.polygon([((0.5 + t * c - u * s) * side, (0.5 + t * s + u * c) * side) for t, u in corners],
                     fill=bg.tone2)
    return img


def _background(bg: Background, size: int, supersample: int) -> Image.Image:
    side = size * supersample
    if bg.kind == "flat":
        return Image.new("RGB", (side, side), bg.tone)
    if bg.kind == "striped":
        return _stripes(bg, side)
    # Noise and gradients at the output size, then pixel-repeated: after the box downscale that is exactly the
    # output-size background, at a quarter of the cost.
    flat = Image.new("RGB", (size, size), bg.tone)
    if bg.kind == "noisy":
        ox, oy = (int(f * (_NOISE_SIDE - size + 1)) for f in bg.noise_at)
        img = ImageChops.add(_noise_bank(bg.noise).crop((ox, oy, ox + size, oy + size)), flat, 1.0, -128)
    else:
        img = Image.composite(Image.new("RGB", (size, size), bg.tone2), flat, _gradient_mask(size, bg.angle))
    return img.resize((side, side), Image.NEAREST) if supersample > 1 else img


def _draw(draw: ImageDraw.ImageDraw, o: SceneObject, side: int) -> None:
    px, py = _POS_XY[o.position]
    cx, cy = (px + o.dx) * side, (py + o.dy) * side
    r = _RADIUS[o.size] * o.scale * side
    rgb = o.rgb
    if o.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    elif o.shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=rgb, width=max(1, round(_RING_WIDTH * r)))
    else:
        a = math.radians(o.angle)
        rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]]) * r
        points = _POLYGONS[o.shape] @ rot + (cx, cy)  # (K, 2)
        draw.polygon(points.ravel().tolist(), fill=rgb)


def render(scene: Scene, size: int = 64, supersample: int = 2) -> Image.Image:
    """The scene as a ``size`` x ``size`` RGB image, drawn at ``supersample`` times the size and box-downscaled
    (anti-aliased edges; 1 draws directly)."""
    side = size * supersample
    img = _background(scene.background, size, supersample)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw(draw, o, side)
    return img.reduce(supersample) if supersample > 1 else img
