"""Opening a whole-slide image with OpenSlide: levels, physical pixel size, region reads.

The pixel size comes from the slide (``openslide.mpp-x`` / ``-y``, which OpenSlide fills from
the vendor's metadata or, for a generic TIFF, from its resolution tags) or from the user
(``--mpp``, which wins); a slide with neither is refused, because tiling at a guessed scale would
show the model cells of the wrong size without saying so. Regions come back as RGB with the
parts outside the scanned area (transparent in OpenSlide) made white, like glass.

OpenSlide errors are sticky: after a failed read the handle refuses every later read, so a read
failure is a :class:`SlideError` and ends the slide rather than skipping one tile.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from breastvision.data.io import BadImageError, file_problem, load_image
from breastvision.errors import BreastvisionError
from breastvision.paths import printable

#: Pixels of a level read at once when a thumbnail is built (a strip of rows), so memory stays
#: bounded on a slide whose pyramid has no small level.
_THUMBNAIL_STRIP_PIXELS = 2**24


class SlideError(BreastvisionError):
    """A slide that cannot be used: unreadable (damaged, truncated, unsupported), without a pixel
    size, or smaller than one tile. ``predict-slide`` lists it as skipped and goes on."""


def parse_mpp(text: str | None) -> tuple[float, float] | None:
    """``"0.25"`` → (0.25, 0.25); ``"0.25,0.3"`` → (0.25, 0.3); ``None`` passes through."""
    if text is None:
        return None
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        raise BreastvisionError(f"'{text}' is not a pixel size in µm (X or X,Y)") from None
    if len(values) not in (1, 2) or min(values) <= 0:
        raise BreastvisionError(f"'{text}' is not a pixel size in µm (one or two positive numbers)")
    return (values[0], values[-1])


@dataclass
class Slide:
    path: Path
    handle: object  # openslide.OpenSlide
    #: µm per level-0 pixel (x, y), and whether it came from the slide or the user.
    mpp: tuple[float, float]
    mpp_source: str

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.handle.dimensions

    @property
    def downsamples(self) -> tuple[float, ...]:
        return tuple(self.handle.level_downsamples)

    @property
    def vendor(self) -> str:
        import openslide

        return self.handle.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown")

    def read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """The RGB region of ``size`` pixels at ``level`` whose top-left is ``location`` (level 0)."""
        import openslide

        try:
            rgba = self.handle.read_region(location, level, size)
        except openslide.OpenSlideError as err:
            raise SlideError(f"{printable(self.path)}: reading the slide failed ({err})") from None
        return _on_white(rgba)

    def thumbnail(self, max_side: int) -> tuple[Image.Image, tuple[float, float]]:
        """The whole slide at most ``max_side`` pixels wide or high, and its downsample (x, y) from
        level 0.

        Read from the smallest level at least as fine, a strip at a time."""
        width, height = self.dimensions
        downsample = max(width, height) / max_side if max(width, height) > max_side else 1.0
        level = self.handle.get_best_level_for_downsample(downsample)
        level_w, level_h = self.handle.level_dimensions[level]
        scale = self.downsamples[level] / downsample
        out_w, out_h = max(1, round(level_w * scale)), max(1, round(level_h * scale))
        thumb = Image.new("RGB", (out_w, out_h), "white")
        strip_rows = max(1, _THUMBNAIL_STRIP_PIXELS // level_w)
        for top in range(0, level_h, strip_rows):
            rows = min(strip_rows, level_h - top)
            strip = self.read((0, round(top * self.downsamples[level])), level, (level_w, rows))
            y0, y1 = round(top * scale), round((top + rows) * scale)
            if y1 > y0:
                thumb.paste(strip.resize((out_w, y1 - y0), Image.Resampling.BILINEAR), (0, y0))
        return thumb, (width / out_w, height / out_h)

    def close(self) -> None:
        self.handle.close()


def _on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGB", rgba.size, "white")
    white.paste(rgba, mask=rgba.getchannel("A"))
    return white


def open_slide(path: str | os.PathLike, mpp: tuple[float, float] | None = None) -> Slide:
    """Open ``path`` with OpenSlide; ``mpp`` (µm per pixel, x and y) overrides the slide's own."""
    import openslide

    path = Path(path)
    problem = file_problem(path)
    if problem is not None:
        raise SlideError(f"{printable(path)}: {problem}")
    try:
        handle = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(f"{printable(path)}: {_unsupported(path)}") from None
    except openslide.OpenSlideError as err:
        raise SlideError(f"{printable(path)}: opening the slide failed ({err})") from None
    if mpp is not None:
        return Slide(path, handle, mpp, "--mpp")
    found = _slide_mpp(handle)
    if found is None:
        handle.close()
        raise SlideError(
            f"{printable(path)}: the slide does not record its pixel size (µm per pixel); pass --mpp "
            "(e.g. --mpp 0.25 for a 40x scan)"
        )
    return Slide(path, handle, found, "slide metadata")


def _unsupported(path: Path) -> str:
    """Why OpenSlide refused ``path``: an ordinary image (which ``predict`` takes: it decodes, not
    just its header, as a truncated slide's does), or not a slide."""
    try:
        with load_image(path) as image:
            size = image.size
    except BadImageError:
        return ("not a whole-slide image OpenSlide can read (truncated or damaged, or not a tiled "
                "pyramidal TIFF / SVS / NDPI / MRXS / DICOM-WSI / other OpenSlide format)")
    return (f"an ordinary image ({size[0]}×{size[1]}), not a whole-slide image: use 'breastvision "
            "predict' for it")


def _slide_mpp(handle: object) -> tuple[float, float] | None:
    import openslide

    props = handle.properties
    try:
        x = float(props[openslide.PROPERTY_NAME_MPP_X])
        y = float(props[openslide.PROPERTY_NAME_MPP_Y])
    except (KeyError, ValueError):
        return None
    return (x, y) if np.isfinite([x, y]).all() and min(x, y) > 0 else None
