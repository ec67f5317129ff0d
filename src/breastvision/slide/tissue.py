"""Tissue detection on a slide thumbnail: which tiles hold tissue and which are glass.

Glass is bright and grey; H&E tissue is coloured or darker. A pixel is tissue when its HSV
saturation is at least ``MIN_SATURATION`` or its grey level at most ``MAX_GREY``. Saturation
alone loses pale, greyish tissue (some BreakHis fibroadenoma fields have a median saturation of
12 of 255 but a grey level near 180) and brightness alone loses bright eosin, so either counts.
Fixed thresholds rather than Otsu's: Otsu splits whatever two populations a thumbnail has, the
two stains when a slide is nearly all tissue, sensor noise when it is all glass; the values are
set so that the pale BreakHis fields count as tissue and white glass does not (glass scanned
darker than ``MAX_GREY`` would count as tissue: every tile would be predicted). A tile's tissue
fraction is the share of tissue pixels under its footprint, summed from an integral image so
that every tile costs four look-ups.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: Thresholds (0–255) of the tissue rule in the module docstring.
MIN_SATURATION = 20
MAX_GREY = 225


def tissue_mask(thumbnail: Image.Image) -> np.ndarray:
    """Boolean H×W mask of tissue pixels in an RGB thumbnail."""
    import cv2

    rgb = np.asarray(thumbnail.convert("RGB"))
    saturation = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return (saturation >= MIN_SATURATION) | (grey <= MAX_GREY)


def tissue_fractions(mask: np.ndarray, downsample: tuple[float, float], boxes: np.ndarray) -> np.ndarray:
    """Share of tissue pixels in each level-0 box (N×4: x, y, width, height), read on ``mask``
    (a thumbnail mask ``downsample`` times smaller than level 0 in x and y)."""
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    height, width = mask.shape
    x0 = np.clip(np.floor(boxes[:, 0] / downsample[0]), 0, width).astype(int)
    y0 = np.clip(np.floor(boxes[:, 1] / downsample[1]), 0, height).astype(int)
    x1 = np.clip(np.ceil((boxes[:, 0] + boxes[:, 2]) / downsample[0]), 0, width).astype(int)
    y1 = np.clip(np.ceil((boxes[:, 1] + boxes[:, 3]) / downsample[1]), 0, height).astype(int)
    x1, y1 = np.maximum(x1, x0 + 1).clip(max=width), np.maximum(y1, y0 + 1).clip(max=height)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = (x1 - x0) * (y1 - y0)
    return np.where(area > 0, inside / np.maximum(area, 1), 0.0)
