"""The debug overlay (`inpaintd process --debug-overlay`): where the regions, mask and feather band are."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from ..core.masks import feather_alpha
from ..core.regions import Region


def render_overlay(pixels: np.ndarray, mask: np.ndarray, regions: list[Region], feather: int = 0) -> bytes:
    """PNG of the image with the feather band (yellow tint), the mask outline (red) and each
    region's crop box (green, labelled with its working size) drawn on it.

    The band is where the result is a mix of painting and original (0 < alpha < 1): the place
    to look for a seam.
    """
    overlay = np.asarray(Image.fromarray(pixels).convert("RGB")).copy()
    alpha = feather_alpha(mask, feather)
    band = (alpha > 0) & (alpha < 1)
    overlay[band] = (overlay[band].astype(np.uint16) + np.array([255, 255, 0], dtype=np.uint16)) // 2
    # A pixel is on the outline when it is masked and one of its 4 neighbours is not.
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    edge = mask & ~inner
    overlay[edge] = (255, 0, 0)
    picture = Image.fromarray(overlay)
    draw = ImageDraw.Draw(picture)
    width = max(1, max(picture.size) // 400)
    for number, region in enumerate(regions, start=1):
        box = region.crop
        draw.rectangle((box.x0, box.y0, box.x1 - 1, box.y1 - 1), outline=(0, 255, 0), width=width)
        draw.text((box.x0 + 3 * width, box.y0 + 3 * width), f"{number}: {region.work_size[0]}x{region.work_size[1]}", fill=(0, 255, 0))
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()
