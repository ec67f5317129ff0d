"""Which slide region becomes one model input: the physical field the model was trained on.

The model file records the µm per pixel of its input (``Preprocessing.mpp``). Before the
resize in ``preprocess_image`` an input is ``resize`` (or ``input_size``) pixels square, so one
tile covers ``side × model_mpp`` µm in x and in y: for a BreakHis model that is the BreakHis
field, non-square in µm because BreakHis fields (700×460) were squashed to a square. In the
slide's level-0 pixels that is ``side × model_mpp / slide_mpp`` per axis. The region is read
from the coarsest pyramid level that is still at least as fine as the model's scale, so the
model-file resize only ever shrinks it, then ``preprocess_image`` resizes it exactly as it
resized the training images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from breastvision.errors import BreastvisionError
from breastvision.models.bundle import Preprocessing
from breastvision.slide.reader import SlideError

#: A level whose downsample exceeds the wanted one by at most this factor still counts as fine
#: enough (downsamples stored as 3.9999 for 4).
_LEVEL_TOLERANCE = 1.01


@dataclass(frozen=True)
class TileGeometry:
    #: Footprint of one tile in level-0 pixels (width, height): also the grid stride.
    size0: tuple[int, int]
    #: The pyramid level read, and the region's size there.
    level: int
    read_size: tuple[int, int]
    #: The field in µm (x, y) and the pixels the model sees it as.
    field_um: tuple[float, float]
    side: int
    #: Slide pixels per model pixel at the level read (< 1: the slide is coarser than the model
    #: was trained at, and tiles are enlarged).
    zoom: tuple[float, float]


def model_scale(preprocessing: Preprocessing, override: tuple[float, float] | None) -> tuple[float, float]:
    """The model input's µm per pixel: ``override`` (``--mpp-model``), else the model file's."""
    if override is not None:
        return override
    if preprocessing.mpp is None:
        raise BreastvisionError(
            "the model file records no training scale (µm per pixel; files written before it was "
            "recorded, or trained on data without one); pass --mpp-model"
        )
    return (float(preprocessing.mpp[0]), float(preprocessing.mpp[1]))


def tile_geometry(
    preprocessing: Preprocessing,
    model_mpp: tuple[float, float],
    slide_mpp: tuple[float, float],
    downsamples: Sequence[float],
    dimensions: tuple[int, int],
) -> TileGeometry:
    """The tile of a slide (``slide_mpp``, its levels' ``downsamples``) for a model of ``model_mpp``."""
    side = preprocessing.resize or preprocessing.input_size
    field = (side * model_mpp[0], side * model_mpp[1])
    size0 = (round(field[0] / slide_mpp[0]), round(field[1] / slide_mpp[1]))
    if min(size0) < 1 or size0[0] > dimensions[0] or size0[1] > dimensions[1]:
        raise SlideError(
            f"one tile ({field[0]:.1f}×{field[1]:.1f} µm = {size0[0]}×{size0[1]} level-0 pixels) "
            f"does not fit the slide ({dimensions[0]}×{dimensions[1]} pixels)"
        )
    wanted = min(size0[0] / side, size0[1] / side)
    level = max((i for i, d in enumerate(downsamples) if d <= wanted * _LEVEL_TOLERANCE), default=0)
    read_size = (max(1, round(size0[0] / downsamples[level])), max(1, round(size0[1] / downsamples[level])))
    zoom = (read_size[0] / side, read_size[1] / side)
    return TileGeometry(size0, level, read_size, field, side, zoom)
