"""A contact sheet of a corpus with each image's truth."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .. import BAND_EDGES, BAND_NAMES, STACKS


def _load_for_preview(path: Path) -> np.ndarray:
    """Any written format (8-bit PNG/JPEG, 16-bit TIFF) → (H, W) uint8 for the contact sheet."""
    from ..images import decode

    return np.round(decode(path.read_bytes(), path.name)[0] * 255).astype(np.uint8)


def preview(corpus: str | os.PathLike, rows: list[dict], dest: str | os.PathLike, tile: int = 256) -> Path:
    """A contact sheet: one example per (stack, class), abnormal boxes drawn in red.

    Prefers, per cell of the sheet, an image that holds abnormal cells, so boxes can be judged."""
    root = Path(corpus)
    stacks = [s for s in STACKS if any(r["stack"] == s for r in rows)]
    pad, head = 6, 22
    sheet = Image.new("RGB", (pad + 4 * (tile + pad), head + len(stacks) * (tile + head + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for si, stack in enumerate(stacks):
        for ci, name in enumerate(BAND_NAMES):
            cands = [r for r in rows if r["stack"] == stack and r["label"] == name]
            x0 = pad + ci * (tile + pad)
            y0 = head + si * (tile + head + pad)
            if not cands:
                draw.text((x0, y0 + tile // 2), f"{stack} class {name}: none", fill="black")
                continue
            cands.sort(key=lambda r: (-min(r["n_abnormal"], 1), abs(r["confluence"] - _band_mid(name))))
            r = cands[0]
            img = Image.fromarray(_load_for_preview(root / r["image"])).convert("RGB")
            sx = tile / img.width
            img = img.resize((tile, tile), Image.BILINEAR)
            d = ImageDraw.Draw(img)
            for x1, y1, x2, y2 in r["boxes"]:
                d.rectangle([x1 * sx, y1 * sx, x2 * sx - 1, y2 * sx - 1], outline=(255, 40, 40), width=2)
            sheet.paste(img, (x0, y0))
            draw.text(
                (x0, y0 - head + 6),
                f"{stack} class {name}  {100 * r['confluence']:.0f}%  {r['n_abnormal']} abnormal",
                fill="black",
            )
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(dest)
    return dest


def _band_mid(name: str) -> float:
    i = BAND_NAMES.index(name)
    return (BAND_EDGES[i] + BAND_EDGES[i + 1]) / 2
