"""Safe image loading: every bad-input case on small generated files, and every mode to RGB."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from PIL import Image

from breastvision.data.io import (
    IMAGE_FORMATS,
    MIN_SIDE,
    BadImageError,
    decode_bytes,
    file_problem,
    load_image,
    load_mask,
    read_header,
    to_rgb,
)
from breastvision.errors import BreastvisionError

SIDE = 40


def _save(image: Image.Image, path, **kw):
    image.save(path, **kw)
    return path


def test_bad_image_error_is_a_user_error():
    assert issubclass(BadImageError, BreastvisionError)


@pytest.mark.parametrize("loader", [load_image, read_header, load_mask])
def test_zero_byte_file(tmp_path, loader):
    path = tmp_path / "empty.png"
    path.touch()
    with pytest.raises(BadImageError, match=r"empty file \(0 bytes\)") as err:
        loader(path)
    assert err.value.path == path and str(path) in str(err.value)


@pytest.mark.parametrize("name", ["notes.png", "notes.jpg"])
def test_non_image_with_image_extension(tmp_path, name):
    path = tmp_path / name
    path.write_text("patient list, not a picture\n")
    with pytest.raises(BadImageError, match="not an image"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    rng = np.random.default_rng(0)
    whole = _save(
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), tmp_path / "a", format=fmt
    )
    data = whole.read_bytes()
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(data[: len(data) // 2])
    assert read_header(cut).width == 64  # the header survives: only decoding can tell
    with pytest.raises(BadImageError, match="corrupt or truncated"):
        load_image(cut)


def test_corrupt_png_data(tmp_path):
    path = _save(Image.new("RGB", (64, 64), (10, 20, 30)), tmp_path / "x.png")
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 4
    data[start : start + 12] = b"\xff" * 12  # garble the compressed stream
    path.write_bytes(bytes(data))
    with pytest.raises(BadImageError, match="corrupt or truncated"):
        load_image(path)


@pytest.mark.parametrize("size", [(1, 1), (MIN_SIDE - 1, 200), (200, 5)])
def test_too_small(tmp_path, size):
    path = _save(Image.new("RGB", size), tmp_path / "tiny.png")
    with pytest.raises(BadImageError, match=rf"{size[0]}×{size[1]} pixels, below the {MIN_SIDE}-pixel"):
        read_header(path)


def test_minimum_side_is_accepted(tmp_path):
    path = _save(Image.new("RGB", (MIN_SIDE, MIN_SIDE)), tmp_path / "ok.png")
    assert load_image(path).size == (MIN_SIDE, MIN_SIDE)


@pytest.mark.parametrize("pixels", [SIDE * SIDE - 1, (SIDE * SIDE) // 2 - 1])
def test_decompression_bomb(tmp_path, monkeypatch, pixels):
    # Over the limit Pillow warns, over twice the limit it raises: both must be refused.
    path = _save(Image.new("L", (SIDE, SIDE)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels)
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_image(path)
    with pytest.raises(BadImageError, match="decompression bomb"):
        read_header(path)


def test_missing_file(tmp_path):
    with pytest.raises(BadImageError, match="cannot be read"):
        load_image(tmp_path / "nowhere.png")


def _rgb_of(path):
    image = load_image(path)
    assert image.mode == "RGB"
    return np.asarray(image)


def test_grey_modes(tmp_path):
    grey = np.tile(np.arange(SIDE, dtype=np.uint8) * 6, (SIDE, 1))
    out = _rgb_of(_save(Image.fromarray(grey, "L"), tmp_path / "l.png"))
    assert (out == grey[..., None]).all()
    binary = Image.fromarray(grey > 100).convert("1")
    out = _rgb_of(_save(binary, tmp_path / "one.png"))
    assert set(np.unique(out)) == {0, 255}


def test_alpha_is_composited_onto_black(tmp_path):
    rgba = Image.new("RGBA", (SIDE, SIDE), (200, 100, 50, 128))
    out = _rgb_of(_save(rgba, tmp_path / "rgba.png"))
    assert tuple(out[0, 0]) == (100, 50, 25)
    la = Image.new("LA", (SIDE, SIDE), (200, 0))  # fully transparent
    assert tuple(_rgb_of(_save(la, tmp_path / "la.png"))[0, 0]) == (0, 0, 0)
    opaque = Image.new("LA", (SIDE, SIDE), (200, 255))
    assert tuple(_rgb_of(_save(opaque, tmp_path / "la2.png"))[0, 0]) == (200, 200, 200)


def test_palette_with_and_without_transparency(tmp_path):
    palette = Image.new("P", (SIDE, SIDE), 1)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    assert tuple(_rgb_of(_save(palette, tmp_path / "p.png"))[0, 0]) == (0, 255, 0)
    palette.info["transparency"] = 1
    assert tuple(_rgb_of(_save(palette, tmp_path / "pt.png", transparency=1))[0, 0]) == (0, 0, 0)


def test_cmyk(tmp_path):
    cmyk = Image.new("CMYK", (SIDE, SIDE), (0, 255, 255, 0))  # pure red in print colours
    out = _rgb_of(_save(cmyk, tmp_path / "c.tiff"))
    assert tuple(out[0, 0]) == (255, 0, 0)


@pytest.mark.parametrize(
    ("dtype", "suffix", "low", "high"),
    [(np.uint16, "png", 1000, 3000), (np.uint16, "png", 0, 65535), (np.int32, "tiff", -500, 70000)],
)
def test_high_bit_depth_is_rescaled_not_clipped(tmp_path, dtype, suffix, low, high):
    ramp = np.linspace(low, high, SIDE * SIDE).reshape(SIDE, SIDE).astype(dtype)
    path = _save(Image.fromarray(ramp), tmp_path / f"deep.{suffix}")
    assert Image.open(path).mode in {"I;16", "I"}
    out = _rgb_of(path)[..., 0].astype(int)
    assert out.min() == 0 and out.max() == 255
    expected = np.round((ramp.astype(float) - low) * 255 / (high - low))
    assert np.abs(out - expected).max() <= 1
    # Clipping would have flattened everything above 255 into one value.
    assert len(np.unique(out)) > 200


def test_constant_high_depth_image(tmp_path):
    flat = Image.fromarray(np.full((SIDE, SIDE), 4000, dtype=np.uint16))
    assert to_rgb(flat).getextrema() == ((0, 0), (0, 0), (0, 0))


def test_load_mask_binarises_and_checks_size(tmp_path):
    mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
    mask[5:10, 5:10] = 1  # some tools store lesion pixels as 1, not 255
    path = _save(Image.fromarray(mask), tmp_path / "m_mask.png")
    out = np.asarray(load_mask(path, (SIDE, SIDE)))
    assert set(np.unique(out)) == {0, 255} and (out > 0).sum() == 25
    with pytest.raises(BadImageError, match="mask is 40×40 but its image is 50×40"):
        load_mask(path, (50, 40))


@pytest.mark.parametrize("fmt", ["EPS", "ICO", "PPM", "PCX"])
@pytest.mark.parametrize("suffix", ["own", ".png"])
def test_formats_outside_the_allow_list_are_refused_by_content(tmp_path, fmt, suffix):
    path = tmp_path / (f"x.{fmt.lower()}" if suffix == "own" else "x.png")
    Image.new("RGB", (48, 48), "gray").save(path, format=fmt)
    for loader in (load_image, read_header):
        with pytest.raises(BadImageError, match=f"content looks like {fmt}, which is not an accepted"):
            loader(path)
    assert fmt not in IMAGE_FORMATS


@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_allowed_formats_are_read_whatever_the_extension(tmp_path, fmt):
    path = _save(Image.new("RGB", (48, 40), "gray"), tmp_path / "scan.dat", format=fmt)
    assert read_header(path).format == fmt and load_image(path).size == (48, 40)


def test_special_files_get_their_own_reason_and_never_block(tmp_path):
    target = _save(Image.new("RGB", (48, 48)), tmp_path / "real.png")
    (tmp_path / "loop.png").symlink_to("loop.png")
    (tmp_path / "dangling.png").symlink_to("gone.png")
    (tmp_path / "folder.png").symlink_to(tmp_path, target_is_directory=True)
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "link.png").symlink_to(target)
    reasons = {
        "loop.png": "symbolic link loop (the link never reaches a file)",
        "dangling.png": "dangling symbolic link (its target gone.png does not exist)",
        "folder.png": "symbolic link to a folder (not followed)",
        "pipe.png": "a named pipe (FIFO), not a regular file",
    }
    for name, reason in reasons.items():
        assert file_problem(tmp_path / name) == reason
        with pytest.raises(BadImageError, match=re.escape(reason)):
            load_image(tmp_path / name)
    assert file_problem(tmp_path / "link.png") is None and load_image(tmp_path / "link.png").size == (48, 48)


def _smooth(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    return coarse.convert(mode)


@pytest.mark.parametrize(
    ("mode", "fmt", "suffix"),
    [("RGB", "PNG", ".png"), ("RGB", "JPEG", ".jpg"), ("P", "PNG", ".png"), ("1", "PNG", ".png"),
     ("I;16", "PNG", ".png"), ("RGBA", "PNG", ".png")],
)
def test_reduced_decoding_never_goes_below_the_size_asked(tmp_path, mode, fmt, suffix):
    path = tmp_path / f"big{suffix}"
    image = _smooth((1500, 1100))
    if mode == "I;16":  # 16-bit grey spanning most of its range
        image = image.convert("I").point(lambda v: v * 200).convert("I;16")
    image.convert(mode).save(path, format=fmt)
    reduced = load_image(path, at_least=(144, 100))
    assert reduced.mode == "RGB"
    assert 144 <= reduced.width < 2 * 144 and 100 <= reduced.height < 2 * 100
    assert decode_bytes(path, at_least=(144, 100)) < decode_bytes(path)
    # What a model would see after resizing either to its input: nearly the same.
    full = np.asarray(load_image(path).resize((72, 72), Image.BILINEAR), dtype=float)
    small = np.asarray(reduced.resize((72, 72), Image.BILINEAR), dtype=float)
    assert np.abs(full - small).mean() < 1.5  # grey levels of 255


def test_reduced_decoding_leaves_small_images_alone(tmp_path):
    path = tmp_path / "small.png"
    _smooth((200, 150)).save(path)
    assert np.array_equal(np.asarray(load_image(path, at_least=(144, 100))), np.asarray(load_image(path)))
