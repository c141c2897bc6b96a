"""Contact sheets of search hits: a PNG grid of thumbnails, or an HTML page, each hit with its rank, score and
name (people would rather look than read a table of paths). Written atomically."""

from __future__ import annotations

import html
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

import edgedistill.core.atomic as atomic
from edgedistill.data.images import open_image, why_unreadable

THUMB = 192          # thumbnail side (px)
LABEL_LINES = 3      # lines of text under a thumbnail
LINE = 13            # px per line of PIL's default font


@dataclass
class Hit:
    rank: int
    score: float
    path: str
    caption: str | None = None


def png_sheet(hits: list[Hit], title: str, out: Path, columns: int = 5) -> Path:
    """A grid of the hits' thumbnails under ``title``; an unreadable image is a grey tile that says why."""
    columns = max(1, min(columns, len(hits)))
    rows = -(-len(hits) // columns)
    cell_h = THUMB + LABEL_LINES * LINE + 8
    sheet = Image.new("RGB", (columns * (THUMB + 8) + 8, 28 + rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 8), title[:160], fill="black")
    for k, hit in enumerate(hits):
        x, y = 8 + (k % columns) * (THUMB + 8), 28 + (k // columns) * cell_h
        sheet.paste(_thumbnail(hit.path), (x, y))
        label = f"#{hit.rank} {hit.score:.3f} {Path(hit.path).name}" + (f" - {hit.caption}" if hit.caption else "")
        for i, line in enumerate(textwrap.wrap(label, width=THUMB // 6)[:LABEL_LINES]):
            draw.text((x, y + THUMB + 2 + i * LINE), line, fill="black")
    with atomic.atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out


def _thumbnail(path: str) -> Image.Image:
    tile = Image.new("RGB", (THUMB, THUMB), (235, 235, 235))
    try:
        image = ImageOps.contain(open_image(path), (THUMB, THUMB))
    except Exception as e:  # noqa: BLE001 - a hit whose file went away still gets its tile
        ImageDraw.Draw(tile).text((6, THUMB // 2), why_unreadable(e)[:28], fill="black")
        return tile
    tile.paste(image, ((THUMB - image.width) // 2, (THUMB - image.height) // 2))
    return tile


def html_sheet(hits: list[Hit], title: str, out: Path) -> Path:
    """A page of the hits (images linked relative to the page when they can be, absolute otherwise)."""
    figures = []
    for hit in hits:
        src = _relative(Path(hit.path), out.parent)
        caption = html.escape(f"#{hit.rank}  {hit.score:.3f}  {Path(hit.path).name}")
        extra = f"<br><small>{html.escape(hit.caption)}</small>" if hit.caption else ""
        figures.append(f'<figure><img src="{html.escape(src)}" loading="lazy"><figcaption>{caption}{extra}'
                       f'</figcaption></figure>')
    page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>body{{font-family:sans-serif}}figure{{display:inline-block;width:{THUMB}px;margin:6px;"
            f"vertical-align:top}}img{{max-width:{THUMB}px;max-height:{THUMB}px}}</style>"
            f"<h3>{html.escape(title)}</h3>\n" + "\n".join(figures) + "\n")
    atomic.write_text(out, page)
    return out


def _relative(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path.absolute(), base.absolute())
    except ValueError:  # another drive (Windows)
        return path.absolute().as_uri()
