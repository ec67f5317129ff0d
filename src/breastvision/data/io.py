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
- **DICOM** (``.dcm`` / ``.dicom``, or the ``DICM`` marker at byte 128) is decoded by
  ``data.dicom``, whose docstring records its own choices (frames, windows, regions, identifiers).
- **Decompression bombs**: Pillow's ``MAX_IMAGE_PIXELS`` is respected; its warning (over the limit)
  and its error (over twice the limit) both become ``BadImageError``.
- **Formats** are an allow-list, :data:`IMAGE_FORMATS`, judged by the content (Pillow is only offered
  those decoders), never by the extension: Pillow reads many more, and some hand the file to other
  programs (EPS and PostScript run Ghostscript when it is installed) or bring rarely exercised parsers
  (PSD, ICO, PCX, ...). A file in another format is refused, naming the format its first bytes suggest.
- **Only regular files** are opened: a FIFO would block the reader forever, and symbolic-link loops,
  dangling links and links to folders (which scans do not follow) each get their own reason.
- **Reduced decoding** (``load_image(path, at_least=(w, h))``, for callers that will shrink the image
  anyway): JPEG is decoded at 1/2, 1/4 or 1/8 scale (``Image.draft``, the DCT's own scaling) and
  anything else box-reduced by whole factors per axis (``Image.reduce``), never below ``(w, h)``.
  This is what Pillow's ``reducing_gap`` does before a resize; with ``at_least`` twice the final
  size a resize afterwards sees nearly the same pixels, and the full-size copy and conversions of a
  huge scan are never made. Modes ``reduce`` refuses are widened first (palette to RGB(A), 1-bit to
  L, 16-bit to 32-bit grey, which the 8-bit rescaling then stretches by the reduced image's range).
  DICOM is decoded whole.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from breastvision.errors import BreastvisionError

#: File extensions treated as images when scanning folders (lower case).
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".dcm", ".dicom"}
)

#: Pillow format names accepted as images (see the module docstring). A format Pillow does not read
#: (DICOM) is dispatched before Pillow is asked.
IMAGE_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF")

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


_SPECIAL_FILES = (
    (stat.S_ISFIFO, "a named pipe (FIFO), not a regular file"),
    (stat.S_ISSOCK, "a socket, not a regular file"),
    (stat.S_ISCHR, "a character device, not a regular file"),
    (stat.S_ISBLK, "a block device, not a regular file"),
)


def _unreachable(path: Path, err: OSError) -> str:
    if not os.path.islink(path):
        return f"cannot be read ({err.strerror})"
    if err.errno == errno.ELOOP:
        return "symbolic link loop (the link never reaches a file)"
    return f"dangling symbolic link (its target {os.readlink(path)} does not exist)"


def _regular_file_size(path: Path) -> int:
    """The size of the regular file ``path`` leads to (following links); anything else is refused."""
    try:
        status = os.stat(path)
    except OSError as err:
        raise BadImageError(_unreachable(path, err), path) from None
    if stat.S_ISREG(status.st_mode):
        return status.st_size
    if stat.S_ISDIR(status.st_mode):
        linked = os.path.islink(path)
        raise BadImageError("symbolic link to a folder (not followed)" if linked else "a folder", path)
    reason = next((text for test, text in _SPECIAL_FILES if test(status.st_mode)), "not a regular file")
    raise BadImageError(reason, path)


def file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a regular file one could read (a broken link, a FIFO, ...), or None."""
    try:
        _regular_file_size(Path(path))
    except BadImageError as err:
        return err.reason
    return None


def _refused_format(path: Path) -> str:
    """The reason for content none of :data:`IMAGE_FORMATS` decoders took, naming the format that Pillow's
    signature checks (first 16 bytes only, no parsing) suggest, if any."""
    accepted = ", ".join(IMAGE_FORMATS)
    Image.init()
    try:
        with path.open("rb") as handle:
            prefix = handle.read(16)
    except OSError:
        prefix = b""
    for name in Image.ID:
        if name not in IMAGE_FORMATS and _signature_matches(Image.OPEN[name][1], prefix):
            return f"content looks like {name}, which is not an accepted image format ({accepted})"
    return f"not an image (content is none of the accepted formats {accepted})"


def _signature_matches(accept: Callable[[bytes], Any] | None, prefix: bytes) -> bool:
    # Some checks unpack integers and fail on a prefix shorter than they read; Pillow catches the same.
    try:
        return accept is not None and bool(accept(prefix))
    except (SyntaxError, IndexError, TypeError, struct.error):
        return False


def _open(path: Path) -> Image.Image:
    """Open lazily, turning every header-level problem into ``BadImageError``."""
    if _regular_file_size(path) == 0:
        raise BadImageError("empty file (0 bytes)", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path, formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImageError(f"refused as a possible decompression bomb ({err})", path) from None
    except UnidentifiedImageError:
        raise BadImageError(_refused_format(path), path) from None
    except PermissionError as err:
        raise BadImageError(f"cannot be read ({err.strerror})", path) from None
    except _DECODE_ERRORS as err:
        raise BadImageError(f"unreadable image header ({err})", path) from None
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        image.close()
        raise BadImageError(
            f"image is {width}×{height} pixels, below the {MIN_SIDE}-pixel minimum side", path
        )
    return image


def _dicom(path: str | os.PathLike) -> ModuleType | None:
    """``data.dicom`` when ``path`` is a DICOM file (pydicom itself is imported only then)."""
    from breastvision.data import dicom

    return dicom if dicom.is_dicom(path) else None


def read_header(path: str | os.PathLike) -> ImageHeader:
    """Size, mode and format from the header alone; raises ``BadImageError`` like :func:`load_image`."""
    if dicom := _dicom(path):
        info = dicom.read_info(path)
        return ImageHeader(info.width, info.height, info.mode, "DICOM")
    with _open(Path(path)) as image:
        return ImageHeader(image.width, image.height, image.mode, image.format or "?")


#: Bytes a pixel takes in Pillow's decoded storage (multi-band modes are kept in 4 bytes a pixel).
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
#: Bytes a pixel of the full-size copy :func:`_widened` makes before reducing.
_WIDENED_BYTES = {"1": 1, "P": 4, "I;16": 4, "I;16L": 4, "I;16B": 4, "I;16N": 4}


def decode_bytes(path: str | os.PathLike, *, at_least: tuple[int, int] | None = None) -> int:
    """About how many bytes ``load_image(path, at_least=...)`` holds at its peak, from the header alone.

    For callers that budget memory. The count is of pixel buffers (the decoded image, its full-size
    copy or widening, the reduced and RGB images); JPEG's draft scaling is taken into account.
    """
    if dicom := _dicom(path):
        info = dicom.read_info(path)
        # Decoded whole: the stored values, their 64-bit windowing, the 8-bit and RGB images.
        return info.width * info.height * (2 * 8 + 1 + 4)
    with _open(Path(path)) as image:
        if at_least is not None:
            image.draft(None, at_least)
        pixels = image.width * image.height
        stored = pixels * _PIXEL_BYTES.get(image.mode, 4)
        if at_least is None:
            return 2 * stored + 4 * pixels
        # A reduced image is under twice ``at_least`` on each side, and is made RGB once more.
        return stored + pixels * _WIDENED_BYTES.get(image.mode, 0) + 2 * 4 * 4 * at_least[0] * at_least[1]


def _decode(path: Path, at_least: tuple[int, int] | None = None) -> Image.Image:
    with _open(path) as image:
        if at_least is not None:
            image.draft(None, at_least)  # JPEG only; a no-op for other formats
        try:
            image.load()
        except _DECODE_ERRORS as err:
            raise BadImageError(f"corrupt or truncated image data ({err})", path) from None
        factors = (1, 1) if at_least is None else (
            max(1, image.width // at_least[0]), max(1, image.height // at_least[1])
        )
        if factors == (1, 1):
            # A detached copy: closing the file would otherwise discard the decoded pixels.
            return image.copy()
        return _widened(image).reduce(factors)


def _widened(image: Image.Image) -> Image.Image:
    """``image`` in a mode ``Image.reduce`` accepts (see the module docstring)."""
    if image.mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode == "1":
        return image.convert("L")
    if image.mode.startswith("I;16"):
        return image.convert("I")
    return image


def stretch_to_8bit(values: np.ndarray) -> np.ndarray:
    """Values rescaled linearly from their own [min, max] to uint8 [0, 255] (a flat array gives 0)."""
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if high == low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _rescale_to_8bit(image: Image.Image) -> Image.Image:
    return Image.fromarray(stretch_to_8bit(np.asarray(image)), mode="L")


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


def load_image(path: str | os.PathLike, *, at_least: tuple[int, int] | None = None) -> Image.Image:
    """Decode a whole image file and return it in RGB, or raise ``BadImageError`` with the reason.

    With ``at_least`` (width, height), a bigger image may come back smaller, but never below that
    size (reduced decoding, see the module docstring).
    """
    if dicom := _dicom(path):
        return dicom.load_dicom(path)
    path = Path(path)
    return _rgb(_decode(path, at_least), path)


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
