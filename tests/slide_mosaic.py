"""A small pyramidal tiled TIFF made of real image patches and white glass, for whole-slide tests
and the slide benchmark: what OpenSlide reads as a generic-tiff slide."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def mosaic(cells: Sequence[Sequence[Image.Image | None]], cell: tuple[int, int]) -> np.ndarray:
    """H×W×3 uint8: ``cells[row][column]``, each resized to ``cell`` (width, height) when it is not
    that size already, side by side; ``None`` is white glass."""
    (w, h), rows, columns = cell, len(cells), max(len(r) for r in cells)
    canvas = np.full((rows * h, columns * w, 3), 255, np.uint8)
    for r, row in enumerate(cells):
        for c, image in enumerate(row):
            if image is not None:
                image = image.convert("RGB")
                if image.size != (w, h):
                    image = image.resize((w, h), Image.Resampling.BICUBIC)
                canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = np.asarray(image)
    return canvas


def write_pyramid(path: Path, pixels: np.ndarray, mpp: float | None, levels: int = 3) -> Path:
    """``pixels`` as level 0 of a tiled, zlib-compressed TIFF pyramid halving per level, with
    resolution tags for ``mpp`` µm per pixel (none when ``mpp`` is None)."""
    import tifffile

    image = Image.fromarray(pixels)
    with tifffile.TiffWriter(path) as tif:
        for level in range(levels):
            scaled = image if level == 0 else image.reduce(2**level)
            options = {}
            if mpp is not None:
                per_cm = 1e4 / (mpp * 2**level)
                options = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(np.asarray(scaled), tile=(128, 128), photometric="rgb", compression="zlib",
                      subfiletype=0 if level == 0 else 1, **options)
    return path
