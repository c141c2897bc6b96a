"""Contact sheets of search hits: a PNG grid of thumbnails, or an HTML page, each hit with its rank, score, name and
caption (people would rather look than read a table of paths); the hits of several queries each under the query's
name. Written atomically."""

from __future__ import annotations

import html
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

import edgedistill.core.atomic as atomic
from edgedistill.core.terminal import safe
from edgedistill.data.images import open_image, why_unreadable

THUMB = 192          # thumbnail side (px)
LINE = 13            # px per line of PIL's default font
GAP = 8              # px between tiles
MAX_CAPTION_LINES = 12  # a caption longer than this many lines ends with "..." (the HTML sheet has it whole)


@dataclass
class Hit:
    rank: int
    score: float
    path: str
    caption: str | None = None
    group: str | None = None   # what found it (a query): the hits of a group share grid rows under its name


def png_sheet(hits: list[Hit], title: str, out: Path, columns: int = 5) -> Path:
    """A grid of the hits' thumbnails under ``title``: every grid row is headed by its group (query) and ranks,
    every tile is labelled with its rank, score, file name and whole caption (wrapped); an unreadable image is a
    grey tile that says why."""
    columns = max(1, min(columns, len(hits) or 1))
    width = columns * (THUMB + GAP) + GAP
    title_lines = _wrap(safe(title), width - 2 * GAP)
    rows = [(_row_header(chunk, width), chunk, [_label(h) for h in chunk]) for chunk in _grid(hits, columns)]
    heights = [len(head) * LINE + 4 + THUMB + max(len(lab) for lab in labels) * LINE + GAP
               for head, _, labels in rows]
    top = GAP + len(title_lines) * LINE + GAP
    sheet = Image.new("RGB", (width, top + sum(heights)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(title_lines):
        draw.text((GAP, GAP + i * LINE), line, fill="black")
    y = top
    for (head, chunk, labels), height in zip(rows, heights):
        for i, line in enumerate(head):
            draw.text((GAP, y + i * LINE), line, fill=(20, 60, 160))
        y_tile = y + len(head) * LINE + 4
        for k, (hit, label) in enumerate(zip(chunk, labels)):
            x = GAP + k * (THUMB + GAP)
            sheet.paste(_thumbnail(hit.path), (x, y_tile))
            for j, line in enumerate(label):
                draw.text((x, y_tile + THUMB + 2 + j * LINE), line, fill="black")
        y += height
    with atomic.atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out


def _grid(hits: list[Hit], columns: int) -> list[list[Hit]]:
    """The grid rows: consecutive hits of one group, at most ``columns`` to a row (a new group starts a row)."""
    rows: list[list[Hit]] = []
    for hit in hits:
        if not rows or len(rows[-1]) == columns or rows[-1][-1].group != hit.group:
            rows.append([])
        rows[-1].append(hit)
    return rows


def _row_header(chunk: list[Hit], width: int) -> list[str]:
    ranks = f"ranks {chunk[0].rank}-{chunk[-1].rank}" if len(chunk) > 1 else f"rank {chunk[0].rank}"
    name = f"{safe(chunk[0].group)}: {ranks}" if chunk[0].group else ranks
    return _wrap(name, width - 2 * GAP)


def _label(hit: Hit) -> list[str]:
    """'#rank  score', the file name, then the whole caption, each wrapped to the thumbnail's width."""
    lines = [f"#{hit.rank}  score {hit.score:.3f}", *_wrap(safe(Path(hit.path).name), THUMB)]
    caption = _wrap(safe(hit.caption), THUMB) if hit.caption else []
    if len(caption) > MAX_CAPTION_LINES:
        caption = caption[:MAX_CAPTION_LINES - 1] + [caption[MAX_CAPTION_LINES - 1][:-3] + "..."]
    return lines + caption


def _wrap(text: str, px: int) -> list[str]:
    """``text`` in lines no wider than ``px`` pixels in PIL's default font (words kept whole where they fit)."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max(8, px // 5)
    while True:
        lines = textwrap.wrap(text, width=width) or [""]
        if width <= 8 or all(measure.textlength(line) <= px for line in lines):
            return lines
        width -= 2


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
    figures, group = [], None
    for hit in hits:
        if hit.group and hit.group != group:
            figures.append(f"<h4>{html.escape(hit.group)}</h4>")
        group = hit.group
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
