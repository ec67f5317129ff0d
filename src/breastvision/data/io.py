"""Safe image loading: every bad file becomes a ``BadImageError`` with a reason, never a crash.

Two entry points: :func:`read_header` looks only at the file header (size, mode, format) and is what
readers and ``data summary`` use to stay fast; :func:`load_image` decodes the whole image and returns
it in RGB. Both reject the same things; only full decoding can also find a truncated pixel stream.

Choices the papers leave open, recorded here:

- **Minimum side** :data:`MIN_SIDE` = 32 pixels. The CNN backbones (ResNet-18, DenseNet-121) reduce
  the input by 32; anything smaller is an icon or a placeholder, not a sample, and a 1×1 "image" is
  almost always a failed export.
- **Transparency** (LA, RGBA, P with a transparent colour) is composited onto black: transparent
  pixels carry no tissue, black is the ultrasound background and what zero padding produces, and
  simply dropping the alpha band would expose whatever colour the encoder left under it.
- **16- and 32-bit grey** (``I;16*``, ``I``, ``F``) is rescaled linearly from the image's own
  [min, max] to [0, 255]. Pillow's own conversion clips at 255 (a 12-bit scan becomes almost all
  white), and a fixed ÷257 would leave a 12-bit scan stored in 16 bits nearly black; min–max
  stretching is what medical viewers do without a window setting.
- **Decompression bombs**: Pillow's ``MAX_IMAGE_PIXELS`` is respected; its warning (over the limit)
  and its error (over twice the limit) both become ``BadImageError``.
"""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from breastvision.errors import BreastvisionError

#: File extensions treated as images when scanning folders (lower case).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"})

#: Smallest accepted width and height, in pixels (see the module docstring).
MIN_SIDE = 32

_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})

# What Pillow's decoders raise on damaged data; anything else is a bug and should surface.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


class BadImageError(BreastvisionError):
    """A file that cannot serve as an image sample; the message says which and why.

    ``reason`` alone (without the path) is what readers record in ``Skipped``.
    """

    def __init__(self, reason: str, path: Path | None = None):
        super().__init__(f"{path}: {reason}" if path is not None else reason)
        self.reason = reason
        self.path = path


@dataclass(frozen=True)
class ImageHeader:
    """What the file header says, read without decoding the pixels."""

    width: int
    height: int
    mode: str
    format: str


def is_image_file(path: Path) -> bool:
    """Whether a file's extension marks it as an image (the content is checked on reading)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _open(path: Path) -> Image.Image:
    """Open lazily, turning every header-level problem into ``BadImageError``."""
    try:
        size = os.stat(path).st_size
    except OSError as err:
        raise BadImageError(f"cannot be read ({err.strerror})", path) from None
    if size == 0:
        raise BadImageError("empty file (0 bytes)", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImageError(f"refused as a possible decompression bomb ({err})", path) from None
    except UnidentifiedImageError:
        raise BadImageError("not an image (content not recognised by Pillow)", path) from None
    except _DECODE_ERRORS as err:
        raise BadImageError(f"unreadable image header ({err})", path) from None
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        image.close()
        raise BadImageError(
            f"image is {width}×{height} pixels, below the {MIN_SIDE}-pixel minimum side", path
        )
    return image


def read_header(path: str | os.PathLike) -> ImageHeader:
    """Size, mode and format from the header alone; raises ``BadImageError`` like :func:`load_image`."""
    with _open(Path(path)) as image:
        return ImageHeader(image.width, image.height, image.mode, image.format or "?")


def _decode(path: Path) -> Image.Image:
    # A detached copy: closing the file would otherwise discard the decoded pixels.
    with _open(path) as image:
        try:
            image.load()
        except _DECODE_ERRORS as err:
            raise BadImageError(f"corrupt or truncated image data ({err})", path) from None
        return image.copy()


def _rescale_to_8bit(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if high == low:
        return Image.new("L", image.size, 0)
    scaled = np.round((values - low) * (255.0 / (high - low)))
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB by the rules in the module docstring."""
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_DEPTH_MODES:
        return _rescale_to_8bit(image).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode in {"L", "1"} and "transparency" in image.info:
        image = image.convert("LA")
    if "A" in image.getbands():
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise BadImageError(f"image mode {image.mode} cannot be converted to RGB ({err})") from None


def _rgb(image: Image.Image, path: Path) -> Image.Image:
    try:
        return to_rgb(image)
    except BadImageError as err:
        raise BadImageError(err.reason, path) from None


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode a whole image file and return it in RGB, or raise ``BadImageError`` with the reason."""
    path = Path(path)
    return _rgb(_decode(path), path)


def load_mask(path: str | os.PathLike, size: tuple[int, int] | None = None) -> Image.Image:
    """A lesion mask as a binary ``L`` image (0 or 255); any non-zero pixel counts as lesion.

    ``size`` (width, height) is the image the mask belongs to; a mask of another size is rejected,
    since resizing it would silently misplace the lesion.
    """
    path = Path(path)
    image = _decode(path)
    grey = _rescale_to_8bit(image) if image.mode in _HIGH_DEPTH_MODES else _rgb(image, path).convert("L")
    if size is not None and grey.size != tuple(size):
        raise BadImageError(f"mask is {grey.width}×{grey.height} but its image is {size[0]}×{size[1]}", path)
    binary = (np.asarray(grey) > 0).astype(np.uint8) * 255
    return Image.fromarray(binary, mode="L")
