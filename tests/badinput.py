"""A standing corpus of bad (and merely unusual) inputs, generated on demand: what a hostile but fair
user hands the toolkit. ``test_bad_input_corpus`` runs every case through ``predict``, ``evaluate``,
``data summary`` and the web endpoint; a case registered here is picked up by all of them.

- **Image cases** (:data:`IMAGE_CASES`, :func:`image_case`): a function that writes one file (or link,
  FIFO, folder) into the folder it is given and returns the path a command meets. ``usable`` cases
  are unusual but valid images (odd modes, 16 bits, animation, EXIF rotation, a non-UTF-8 name) that
  every command must process; all others must end as a listed skip. A case that cannot be made here
  (unreadable permissions when running as root, a file system refusing a name) returns None.
  DICOM cases (made by ``dicom_factory``, so they carry its sentinel patient attributes) are here too.
- **Manifest cases** (:data:`MANIFEST_CASES`, :func:`manifest_case`): the bytes of a ``manifest.csv``
  over a folder of good images (:data:`GOOD_ROWS`), and either the one-line error it must give or
  the reasons its bad rows must be listed with while the good rows are read.

Model-file, checkpoint and config cases are in ``test_bad_models_configs`` (each is a good model
file or config with one defect, so they start from one).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

#: Side of the generated images: above ``data.io.MIN_SIDE``, small enough to keep the tests fast.
SIDE = 40


def noise(size: tuple[int, int] = (SIDE, SIDE + 8), seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def encoded(image: Image.Image, image_format: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **params)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims ``width``×``height`` (a decompression bomb's header)."""
    data = encoded(noise((32, 32)), "PNG")
    ihdr = bytearray(data[16:29])  # after the signature, the IHDR chunk's length and type
    struct.pack_into(">II", ihdr, 0, width, height)
    return data[:8] + _chunk(b"IHDR", bytes(ihdr)) + data[33:]


def png_16bit_rgb(size: tuple[int, int] = (SIDE, SIDE)) -> bytes:
    """A 48-bit RGB PNG, which Pillow cannot write: built chunk by chunk."""
    width, height = size
    pixels = np.random.default_rng(5).integers(0, 65536, (height, width * 3), dtype=np.uint16)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    chunks = _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def psd(size: tuple[int, int] = (SIDE, SIDE)) -> bytes:
    """A raw RGB Photoshop file (Pillow reads PSD but cannot write it)."""
    width, height = size
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    return header + struct.pack(">IIIH", 0, 0, 0, 0) + bytes(3 * width * height)


def cut(data: bytes, fraction: float) -> bytes:
    return data[: int(len(data) * fraction)]


# -- image cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageCase:
    name: str
    make: Callable[[Path], Path | None]
    #: An unusual but valid image every command must process; otherwise it must be a listed skip.
    usable: bool = False


IMAGE_CASES: dict[str, ImageCase] = {}


def image_case(name: str, *, usable: bool = False):
    def register(make: Callable[[Path], Path | None]) -> Callable[[Path], Path | None]:
        assert name not in IMAGE_CASES, name
        IMAGE_CASES[name] = ImageCase(name, make, usable)
        return make

    return register


def _file_case(name: str, file_name: str, data: Callable[[], bytes], *, usable: bool = False) -> None:
    """A case that is one regular file holding ``data()``."""

    def make(folder: Path) -> Path:
        path = folder / file_name
        path.write_bytes(data())
        return path

    image_case(name, usable=usable)(make)


_PNG = encoded(noise(seed=1), "PNG")
_JPEG = encoded(noise(seed=2), "JPEG", quality=90)
_TIFF = encoded(noise(seed=3), "TIFF")
_GIF = encoded(noise(seed=4, mode="P"), "GIF")
_WEBP = encoded(noise(seed=5), "WEBP")
_BMP = encoded(noise(seed=6), "BMP")
_EPS = encoded(noise(seed=7), "EPS")

# Bad bytes: each must be a listed skip.
_file_case("zero_byte", "zero_byte.png", lambda: b"")
_file_case("png_signature_only", "png_signature_only.png", lambda: _PNG[:8])
_file_case("png_cut_in_header", "png_cut_in_header.png", lambda: _PNG[:30])
_file_case("png_cut_half", "png_cut_half.png", lambda: cut(_PNG, 0.5))
_file_case("png_cut_90", "png_cut_90.png", lambda: cut(_PNG, 0.9))
_file_case("png_bad_crc", "png_bad_crc.png", lambda: _PNG[:-20] + bytes(4) + _PNG[-16:])
_file_case("jpeg_cut_in_header", "jpeg_cut_in_header.jpg", lambda: _JPEG[:120])
_file_case("jpeg_cut_half", "jpeg_cut_half.jpg", lambda: cut(_JPEG, 0.5))
_file_case("jpeg_cut_90", "jpeg_cut_90.jpg", lambda: cut(_JPEG, 0.9))
_file_case("jpeg_soi_then_garbage", "jpeg_soi_then_garbage.jpg",
           lambda: b"\xff\xd8\xff" + np.random.default_rng(8).bytes(500))
_file_case("tiff_cut_in_header", "tiff_cut_in_header.tif", lambda: _TIFF[:8])
_file_case("tiff_cut_half", "tiff_cut_half.tif", lambda: cut(_TIFF, 0.5))
_file_case("gif_cut_half", "gif_cut_half.gif", lambda: cut(_GIF, 0.5))
_file_case("webp_cut_half", "webp_cut_half.webp", lambda: cut(_WEBP, 0.5))
_file_case("bmp_cut_half", "bmp_cut_half.bmp", lambda: cut(_BMP, 0.5))
_file_case("random_bytes", "random_bytes.png", lambda: np.random.default_rng(9).bytes(2000))
_file_case("text_named_png", "text_named_png.png", lambda: b"this is text, not a PNG\n" * 10)
_file_case("html_named_jpg", "html_named_jpg.jpg",
           lambda: b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>\n")
_file_case("svg_named_png", "svg_named_png.png",
           lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect/></svg>')
# Formats Pillow reads that are not on the allow-list (EPS and PS would run Ghostscript).
_file_case("eps", "figure.eps", lambda: _EPS)
_file_case("eps_named_png", "eps_named_png.png", lambda: _EPS)
_file_case("eps_cut_half", "eps_cut_half.png", lambda: cut(_EPS, 0.5))
_file_case("postscript", "page.ps", lambda: _EPS.replace(b" EPSF-3.0", b""))
_file_case("pdf", "report.pdf", lambda: encoded(noise(seed=10), "PDF"))
_file_case("ico", "favicon.ico", lambda: encoded(noise((48, 48), seed=11), "ICO"))
_file_case("ico_named_png", "ico_named_png.png", lambda: encoded(noise((48, 48), seed=11), "ICO"))
_file_case("psd", "layers.psd", psd)
_file_case("psd_named_png", "psd_named_png.png", psd)
_file_case("ppm_named_png", "ppm_named_png.png", lambda: encoded(noise(seed=12), "PPM"))
_file_case("pcx_named_png", "pcx_named_png.png", lambda: encoded(noise(seed=13), "PCX"))
_file_case("tga_named_png", "tga_named_png.png", lambda: encoded(noise(seed=14), "TGA"))
# Sizes.
_file_case("one_by_one", "one_by_one.png", lambda: encoded(noise((1, 1)), "PNG"))
_file_case("tiny", "tiny.png", lambda: encoded(noise((16, 12)), "PNG"))
_file_case("one_pixel_wide", "one_pixel_wide.png", lambda: encoded(noise((1, 400)), "PNG"))
_file_case("bomb_header", "bomb_header.png", lambda: png_claiming(100_000, 100_000))
_file_case("bomb_warning_header", "bomb_warning_header.png", lambda: png_claiming(10_000, 10_000))

# Unusual but valid: each must be processed.
_file_case("fake_extension_jpeg_as_png", "jpeg_inside.png", lambda: _JPEG, usable=True)
_file_case("tiff_good", "good.tiff", lambda: _TIFF, usable=True)
_file_case("gif_good", "good.gif", lambda: _GIF, usable=True)
_file_case("webp_good", "good.webp", lambda: _WEBP, usable=True)
_file_case("bmp_good", "good.bmp", lambda: _BMP, usable=True)
_file_case("min_side_exactly", "min_side_exactly.png", lambda: encoded(noise((32, 32)), "PNG"), usable=True)
for _mode in ("1", "L", "LA", "P", "RGBA", "I;16"):
    _file_case(f"mode_{_mode}", f"mode_{_mode.replace(';', '')}.png",
               lambda m=_mode: encoded(noise(seed=15, mode="L" if m == "I;16" else m).convert(m), "PNG"),
               usable=True)
_file_case("mode_P_transparency", "mode_P_transparency.png",
           lambda: encoded(noise(seed=16, mode="P"), "PNG", transparency=0), usable=True)
_file_case("mode_CMYK_jpeg", "mode_CMYK.jpg", lambda: encoded(noise(seed=17, mode="CMYK"), "JPEG"),
           usable=True)
_file_case("mode_YCbCr_tiff", "mode_YCbCr.tif", lambda: encoded(noise(seed=18, mode="YCbCr"), "TIFF"),
           usable=True)
_file_case("mode_I_tiff", "mode_I.tif",
           lambda: encoded(Image.fromarray(np.arange(SIDE * SIDE, dtype=np.int32).reshape(SIDE, -1)), "TIFF"),
           usable=True)
_file_case("mode_F_tiff", "mode_F.tif",
           lambda: encoded(Image.fromarray(np.random.default_rng(19).random((SIDE, SIDE), "f4")), "TIFF"),
           usable=True)
_file_case("png_16bit_rgb", "png_16bit_rgb.png", png_16bit_rgb, usable=True)


@image_case("animated_gif", usable=True)
def _animated_gif(folder: Path) -> Path:
    frames = [noise(seed=20 + i, mode="P") for i in range(3)]
    path = folder / "animated.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


@image_case("multipage_tiff", usable=True)
def _multipage_tiff(folder: Path) -> Path:
    pages = [noise(seed=23 + i) for i in range(2)]
    path = folder / "multipage.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    return path


@image_case("exif_rotated_jpeg", usable=True)
def _exif_rotated(folder: Path) -> Path:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    path = folder / "exif_rotated.jpg"
    noise((SIDE + 16, SIDE), seed=25).save(path, exif=exif)
    return path


@image_case("non_utf8_name", usable=True)
def _non_utf8_name(folder: Path) -> Path | None:
    path = folder / os.fsdecode(b"caf\xe9_scan_\xff.png")  # Latin-1 é and a byte no encoding uses
    try:
        noise(seed=26).save(path, format="PNG")
    except OSError:  # a file system that only takes valid UTF-8 names
        return None
    return path


@image_case("folder_named_like_image", usable=True)
def _folder_named_like_image(folder: Path) -> Path:
    """A folder called ``scan.png``: not a bad file but a folder; the image inside it is used."""
    inner = folder / "folder_named.png" / "inside.png"
    inner.parent.mkdir()
    noise(seed=27).save(inner)
    return inner


# Things that are not regular files: each must be a listed skip, and none may block a reader.
@image_case("symlink_loop")
def _symlink_loop(folder: Path) -> Path:
    path = folder / "symlink_loop.png"
    path.symlink_to(path.name)
    return path


@image_case("symlink_loop_pair")
def _symlink_loop_pair(folder: Path) -> Path:
    (folder / "loop_b.png").symlink_to("loop_a.png")
    (folder / "loop_a.png").symlink_to("loop_b.png")
    return folder / "loop_a.png"


@image_case("dangling_symlink")
def _dangling_symlink(folder: Path) -> Path:
    path = folder / "dangling.png"
    path.symlink_to("no_such_target.png")
    return path


@image_case("symlink_to_folder")
def _symlink_to_folder(folder: Path) -> Path:
    """A link to a folder holding an image: links to folders are not followed (no loops)."""
    target = folder.parent.parent / f"linked_target_{folder.parent.name}_{folder.name}"
    target.mkdir(exist_ok=True)
    noise(seed=28).save(target / "behind_link.png")
    path = folder / "linked_folder"
    path.symlink_to(target, target_is_directory=True)
    return path


@image_case("symlink_to_parent")
def _symlink_to_parent(folder: Path) -> Path:
    """``up -> ..``: a scan that followed links to folders would never end."""
    path = folder / "up"
    path.symlink_to("..", target_is_directory=True)
    return path


@image_case("fifo")
def _fifo(folder: Path) -> Path:
    path = folder / "fifo.png"
    os.mkfifo(path)
    return path


@image_case("unreadable_permissions")
def _unreadable(folder: Path) -> Path | None:
    path = folder / "unreadable.png"
    path.write_bytes(_PNG)
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: the case cannot be made
        path.unlink()
        return None
    return path


# DICOM: usable ones (one frame each: every case is one sample) and bad ones, each a listed skip.
def _dicom_case(name: str, file_name: str, build: Callable[[Path], None], *, usable: bool = False) -> None:
    def make(folder: Path) -> Path:
        path = folder / file_name
        build(path)
        return path

    image_case(name, usable=usable)(make)


def _grey(seed: int, size: tuple[int, int] = (SIDE, SIDE + 8)) -> np.ndarray:
    return np.asarray(noise(size, seed=seed, mode="L"))


def _dicom_bytes(**options) -> bytes:
    """A DICOM file's bytes (written through a temporary file: pydicom writes paths)."""
    import tempfile

    from dicom_factory import make_dicom

    with tempfile.TemporaryDirectory() as tmp:
        pixels = options.pop("pixels", _grey(30))
        return make_dicom(Path(tmp) / "x.dcm", pixels, **options).read_bytes()


def rle_bad_offset() -> bytes:
    """An RLE DICOM whose header puts its one segment beyond the data: found only when decoded."""
    data = bytearray(_dicom_bytes(encoding="rle"))
    fragment = data.rfind(b"\xfe\xff\x00\xe0") + 8  # after the last item tag and its length
    data[fragment : fragment + 8] = struct.pack("<II", 1, 99_999)
    return bytes(data)


def _edited_dicom(path: Path, edit: Callable, **options) -> None:
    from pydicom import dcmread

    path.write_bytes(_dicom_bytes(**options))
    ds = dcmread(path)
    edit(ds)
    ds.save_as(path)


_dicom_case("dicom_good", "scan.dcm", lambda p: p.write_bytes(_dicom_bytes()), usable=True)
_dicom_case("dicom_rle_rgb", "scan_rle_rgb.dcm", lambda p: p.write_bytes(
    _dicom_bytes(pixels=np.asarray(noise(seed=31)), photometric="RGB", encoding="rle")), usable=True)
_dicom_case("dicom_named_png", "dicom_inside.png", lambda p: p.write_bytes(_dicom_bytes()), usable=True)
_dicom_case("dicom_zero_byte", "zero_byte.dcm", lambda p: p.write_bytes(b""))
_dicom_case("dicom_text", "text.dcm", lambda p: p.write_text("a report, not a DICOM file\n"))
_dicom_case("dicom_cut_in_header", "cut_in_header.dcm", lambda p: p.write_bytes(_dicom_bytes()[:300]))
_dicom_case("dicom_cut_in_pixels", "cut_in_pixels.dcm", lambda p: p.write_bytes(cut(_dicom_bytes(), 0.8)))
_dicom_case("dicom_rle_cut", "rle_cut.dcm", lambda p: p.write_bytes(cut(_dicom_bytes(encoding="rle"), 0.8)))
_dicom_case("dicom_rle_bad_offset", "rle_bad_offset.dcm", lambda p: p.write_bytes(rle_bad_offset()))
_dicom_case("dicom_no_pixel_data", "no_pixels.dcm",
            lambda p: _edited_dicom(p, lambda ds: delattr(ds, "PixelData")))
_dicom_case("dicom_unknown_syntax", "unknown_syntax.dcm", lambda p: p.write_bytes(
    _dicom_bytes().replace(b"1.2.840.10008.1.2.1\0", b"1.2.840.99999.9.9.9\0")))
_dicom_case("dicom_tiny", "tiny.dcm", lambda p: p.write_bytes(_dicom_bytes(pixels=_grey(32, (16, 12)))))
_dicom_case("dicom_bomb_header", "bomb.dcm", lambda p: _edited_dicom(
    p, lambda ds: setattr(ds, "Rows", 20000) or setattr(ds, "Columns", 20000), encoding="rle"))
_dicom_case("dicom_unsupported_photometric", "ybr_partial_420.dcm", lambda p: _edited_dicom(
    p, lambda ds: setattr(ds, "PhotometricInterpretation", "YBR_PARTIAL_420")))


@image_case("dicom_fifo")
def _dicom_fifo(folder: Path) -> Path:
    path = folder / "fifo.dcm"
    os.mkfifo(path)
    return path


def write_image_corpus(folder: Path, names: list[str] | None = None) -> dict[str, Path]:
    """Every image case (or those named) written into ``folder``: case name → the path made."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for name in names or list(IMAGE_CASES):
        path = IMAGE_CASES[name].make(folder)
        if path is not None:
            made[name] = path
    return made


# -- manifest cases -----------------------------------------------------------------------------

#: The good images every manifest case lists (below ``imgs/``), with their labels.
GOOD_ROWS = (("imgs/g0.png", "benign"), ("imgs/g1.png", "malignant"), ("imgs/g2.png", "benign"),
             ("imgs/g3.png", "malignant"))
#: An image outside the manifest's folder, which rows may try to reach.
OUTSIDE = "outside.png"


@dataclass(frozen=True)
class ManifestCase:
    name: str
    #: The manifest's bytes, given the folder holding it and the folder above it (with OUTSIDE).
    body: Callable[[Path, Path], bytes]
    #: A substring of the one-line error every command must give; None: the good rows are read.
    error: str | None = None
    #: Substrings of the reasons the bad rows must be listed with (one per bad row).
    skips: tuple[str, ...] = ()


MANIFEST_CASES: dict[str, ManifestCase] = {}


def manifest_case(name: str, *, error: str | None = None, skips: tuple[str, ...] = ()):
    def register(body: Callable[[Path, Path], bytes]) -> Callable[[Path, Path], bytes]:
        assert name not in MANIFEST_CASES, name
        MANIFEST_CASES[name] = ManifestCase(name, body, error, skips)
        return body

    return register


def good_lines() -> str:
    return "".join(f"{path},{label}\n" for path, label in GOOD_ROWS)


def _grouped_good_lines() -> str:
    return "".join(f"{path},{label},g{i}\n" for i, (path, label) in enumerate(GOOD_ROWS))


def _with_rows(*extra: str, header: str = "path,label") -> Callable[[Path, Path], bytes]:
    return lambda folder, above: (f"{header}\n" + good_lines() + "".join(extra)).encode()


manifest_case("plain")(_with_rows())
manifest_case("absolute_path_outside", skips=("outside the manifest's folder",))(
    lambda folder, above: f"path,label\n{good_lines()}{above / OUTSIDE},benign\n".encode())
manifest_case("dotdot_escape", skips=("outside the manifest's folder",))(_with_rows(f"../{OUTSIDE},benign\n"))
manifest_case("dotdot_inside_then_out", skips=("outside the manifest's folder",))(
    _with_rows(f"imgs/../../{OUTSIDE},malignant\n"))
manifest_case("root_path", skips=("outside the manifest's folder",))(_with_rows("/,benign\n"))
manifest_case("all_rows_outside", error="lists no images it can use")(
    lambda folder, above: f"path,label\n../{OUTSIDE},benign\n{above / OUTSIDE},malignant\n".encode())
manifest_case("absolute_path_inside")(
    lambda folder, above: ("path,label\n" + "".join(f"{folder / p},{x}\n" for p, x in GOOD_ROWS)).encode())
manifest_case("missing_file", skips=("missing on disk",))(_with_rows("imgs/gone.png,benign\n"))
manifest_case("path_is_a_folder", skips=("missing on disk",))(_with_rows("imgs,benign\n"))
manifest_case("empty_path", skips=("empty path",))(_with_rows(",benign\n"))
manifest_case("empty_label", skips=("unknown label ''",))(_with_rows("imgs/g4.png,\n"))
manifest_case("short_row", skips=("unknown label ''",))(_with_rows("imgs/g4.png\n"))
manifest_case("duplicate_rows", skips=("listed again",))(_with_rows("imgs/g0.png,benign\n"))
manifest_case("bad_image_row", skips=("not an image",))(_with_rows("imgs/notes.png,benign\n"))
manifest_case("extra_columns")(_with_rows("imgs/g4.png,benign,x,y,z\n", header="path,label,site"))
manifest_case("missing_columns", error="manifest lacks column(s) path, label")(
    lambda folder, above: b"file,class\nimgs/g0.png,benign\n")
manifest_case("missing_label_column", error="manifest lacks column(s) label")(
    lambda folder, above: b"path\nimgs/g0.png\n")
manifest_case("empty_file", error="manifest lacks column(s) path, label")(lambda folder, above: b"")
manifest_case("header_only", error="manifest lists no images")(lambda folder, above: b"path,label\n")
manifest_case("utf8_bom")(lambda folder, above: b"\xef\xbb\xbf" + _with_rows()(folder, above))
manifest_case("crlf_line_endings")(lambda folder, above: _with_rows()(folder, above).replace(b"\n", b"\r\n"))
manifest_case("non_utf8", error="cannot read manifest")(
    lambda folder, above: _with_rows()(folder, above) + "imgs/caf\xe9.png,benign\n".encode("latin-1"))
manifest_case("empty_group", skips=("empty 'group'",))(
    lambda folder, above: ("path,label,group\n" + _grouped_good_lines()
                           + "imgs/g4.png,benign,\n").encode())
manifest_case("unterminated_quote", skips=("unknown label ''",))(_with_rows('"imgs/g4.png,benign\n'))


def write_manifest_case(case: ManifestCase, folder: Path) -> Path:
    """``folder/data/manifest.csv`` for ``case`` over the good images (and ``g4.png``, a spare image
    the bad rows use, and ``notes.png``, a text file), with an image outside at ``folder/OUTSIDE``."""
    data = folder / "data"
    (data / "imgs").mkdir(parents=True)
    for i, (rel, _) in enumerate(GOOD_ROWS):
        noise(seed=40 + i).save(data / rel)
    noise(seed=45).save(data / "imgs" / "g4.png")
    (data / "imgs" / "notes.png").write_text("not an image")
    noise(seed=46).save(folder / OUTSIDE)
    manifest = data / "manifest.csv"
    manifest.write_bytes(case.body(data, folder))
    return manifest
