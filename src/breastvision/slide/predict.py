"""Predicting one slide: tissue tiles streamed through the model file's pre-processing, in batches.

Each tile is read, pre-processed by the predictor (``data.transforms.preprocess_image``: the
model's fitted stain normaliser, then its resize and normalisation) and predicted exactly as
``breastvision predict`` predicts an image file, so a tile holding the pixels of an image gets
that image's probabilities. Only one batch of tile images is in memory at a time; what is kept
per tile is its box and its probabilities.

**Slide-level score** (:func:`aggregate`): the mean probability of the positive class over the
tissue tiles, and the fraction of tissue tiles whose probability reaches a threshold (0.5 by
default). The mean says how much of the tissue looks positive on average; the fraction says how
much tissue would be flagged tile by tile, which a small positive focus in a large slide moves
more than it moves the mean. Neither is a calibrated slide diagnosis: the model was trained on
patches, not slides.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from breastvision.errors import BreastvisionError
from breastvision.paths import printable
from breastvision.serving.predict import Predictor, batched
from breastvision.slide.reader import Slide, open_slide
from breastvision.slide.scale import TileGeometry, tile_geometry
from breastvision.slide.tiling import Grid, tissue_grid
from breastvision.slide.tissue import tissue_mask

#: Tissue-mask thumbnail side bounds, and the mask pixels wanted across one tile.
_MASK_MIN_SIDE, _MASK_MAX_SIDE, _MASK_PIXELS_PER_TILE = 512, 4096, 8


@dataclass
class SlideRun:
    name: str
    path: Path
    slide: dict[str, Any]
    geometry: TileGeometry
    grid: Grid
    #: One row per ``grid.tiles`` entry, columns in ``class_names`` order.
    probabilities: np.ndarray
    class_names: list[str]
    thumbnail: Image.Image
    #: Level-0 pixels per thumbnail pixel (x, y).
    thumbnail_downsample: tuple[float, float]
    seconds: float
    min_tissue: float
    #: The test-time augmentation view set averaged per tile (``None``: none).
    tta: str | None


def _thumbnail_side(dimensions: tuple[int, int], size0: tuple[int, int], wanted: int) -> int:
    """Fine enough for the tissue mask (a few mask pixels per tile) and for a ``wanted``-pixel
    heat-map, never finer than level 0."""
    mask_side = min(max(max(dimensions) * _MASK_PIXELS_PER_TILE / min(size0), _MASK_MIN_SIDE), _MASK_MAX_SIDE)
    return int(min(max(mask_side, wanted), max(dimensions)))


def predict_slide(
    predictor: Predictor,
    path: str | Path,
    model_mpp: tuple[float, float],
    *,
    slide_mpp: tuple[float, float] | None = None,
    min_tissue: float = 0.5,
    batch_size: int = 16,
    tta: bool | str | None = False,
    thumbnail_side: int = 2048,
    on_start: Callable[[str, int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> SlideRun:
    """Predict every tissue tile of the slide at ``path`` (``SlideError`` if it cannot be used).

    The thumbnail kept for the heat-map is about ``thumbnail_side`` pixels (more when the tissue
    mask needs it). ``on_start(name, n_tiles)`` is called once the tissue tiles are known,
    ``on_batch(n)`` after each batch, for progress bars. ``tta``: ``serving.predict.TtaChoice``.
    """
    if not 0.0 <= min_tissue <= 1.0:
        raise BreastvisionError(f"--min-tissue must be in [0, 1], got {min_tissue}")
    started = time.perf_counter()
    tta = predictor.resolve_tta(tta)
    slide = open_slide(path, slide_mpp)
    try:
        geometry = tile_geometry(
            predictor.preprocessing, model_mpp, slide.mpp, slide.downsamples, slide.dimensions
        )
        side = _thumbnail_side(slide.dimensions, geometry.size0, thumbnail_side)
        thumbnail, downsample = slide.thumbnail(side)
        grid = tissue_grid(slide.dimensions, geometry.size0, tissue_mask(thumbnail), downsample, min_tissue)
        name = printable(Path(path).name)
        if on_start:
            on_start(name, len(grid.tiles))
        rows = []
        for batch in batched(grid.tiles, batch_size):
            tensors = [predictor.preprocess(read_tile(slide, geometry, t.x, t.y)) for t in batch]
            rows.append(predictor.probabilities(torch.stack(tensors), tta=tta))
            if on_batch:
                on_batch(len(batch))
        info = {"vendor": slide.vendor, "dimensions": list(slide.dimensions),
                "levels": len(slide.downsamples), "mpp": list(slide.mpp), "mpp_source": slide.mpp_source}
    finally:
        slide.close()
    probabilities = np.concatenate(rows) if rows else np.zeros((0, len(predictor.class_names)), np.float32)
    return SlideRun(name, Path(path), info, geometry, grid, probabilities, predictor.class_names, thumbnail,
                    downsample, time.perf_counter() - started, min_tissue, tta)


def positive_class(class_names: list[str], requested: str | None) -> str:
    """The class the slide score is about: ``requested``, else ``malignant`` when the model has it."""
    name = requested or ("malignant" if "malignant" in class_names else None)
    if name is None or name not in class_names:
        raise BreastvisionError(
            f"choose the class to score with --positive (one of {', '.join(class_names)})"
            if name is None else f"--positive '{name}' is not a class of the model ({', '.join(class_names)})"
        )
    return name


def aggregate(run: SlideRun, positive: str, threshold: float) -> dict[str, Any]:
    """The slide-level score (module docstring) and the mean probability of every class."""
    p = run.probabilities[:, run.class_names.index(positive)] if len(run.probabilities) else np.zeros(0)
    empty = len(p) == 0
    return {
        "aggregation": f"mean p({positive}) over tissue tiles; fraction of tissue tiles with "
                       f"p({positive}) >= {threshold:g}",
        "positive_class": positive,
        "score": None if empty else float(p.mean()),
        "threshold": threshold,
        "fraction_above_threshold": None if empty else float((p >= threshold).mean()),
        "mean_probabilities": {
            c: None if empty else float(run.probabilities[:, i].mean()) for i, c in enumerate(run.class_names)
        },
    }


def summarize(run: SlideRun, predictor: Predictor, model_mpp: tuple[float, float], positive: str,
              threshold: float) -> dict[str, Any]:
    """The JSON summary of one slide: what was read, how it was tiled, the score, the throughput."""
    g = run.geometry
    return {
        "slide": {"file": printable(run.path), **run.slide},
        "model": {"file": printable(predictor.source), "architecture": predictor.info.architecture,
                  "backend": predictor.backend, "mpp": list(model_mpp), "tta": run.tta},
        "tiling": {"field_um": [round(v, 3) for v in g.field_um], "tile_level0_px": list(g.size0),
                   "level": g.level, "read_px": list(g.read_size), "model_px": g.side,
                   "slide_px_per_model_px": [round(z, 3) for z in g.zoom], "min_tissue": run.min_tissue},
        "tiles": {"grid": run.grid.total, "tissue": len(run.grid.tiles),
                  "background_skipped": run.grid.background},
        **aggregate(run, positive, threshold),
        "seconds": round(run.seconds, 3),
        "tiles_per_second": round(len(run.grid.tiles) / run.seconds, 2) if run.seconds > 0 else None,
    }


def read_tile(slide: Slide, geometry: TileGeometry, x: int, y: int) -> Image.Image:
    """The region the tile at level-0 ``(x, y)`` is predicted from, before pre-processing."""
    return slide.read((x, y), geometry.level, geometry.read_size)
