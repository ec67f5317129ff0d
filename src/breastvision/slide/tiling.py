"""The tile grid of a slide: full tiles from the top-left corner, kept when they hold tissue.

Tiles do not overlap (the stride is the tile), and the partial tiles at the right and bottom edge
are left out, so every tile the model sees is the field it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from breastvision.slide.tissue import tissue_fractions


@dataclass(frozen=True)
class Tile:
    column: int
    row: int
    #: Top-left corner and size in level-0 pixels.
    x: int
    y: int
    width: int
    height: int
    tissue: float


@dataclass
class Grid:
    columns: int
    rows: int
    #: The tiles with enough tissue, row by row.
    tiles: list[Tile]

    @property
    def total(self) -> int:
        return self.columns * self.rows

    @property
    def background(self) -> int:
        return self.total - len(self.tiles)


def tissue_grid(
    dimensions: tuple[int, int],
    size0: tuple[int, int],
    mask: np.ndarray,
    downsample: tuple[float, float],
    min_tissue: float,
) -> Grid:
    """The grid of ``size0`` tiles over a level-0 image of ``dimensions``, keeping those whose
    tissue fraction on ``mask`` (a thumbnail mask, ``downsample`` from level 0) is ≥ ``min_tissue``."""
    columns, rows = dimensions[0] // size0[0], dimensions[1] // size0[1]
    rr, cc = np.divmod(np.arange(columns * rows), columns)
    width, height = np.full_like(cc, size0[0]), np.full_like(cc, size0[1])
    boxes = np.stack([cc * size0[0], rr * size0[1], width, height], 1)
    fractions = tissue_fractions(mask, downsample, boxes) if len(boxes) else np.zeros(0)
    keep = np.flatnonzero(fractions >= min_tissue)
    tiles = [Tile(int(cc[i]), int(rr[i]), int(boxes[i, 0]), int(boxes[i, 1]), *size0, float(fractions[i]))
             for i in keep]
    return Grid(columns, rows, tiles)
