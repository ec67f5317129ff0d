"""What ``predict-slide`` writes per slide into ``--out``:

- ``<slide>_tiles.csv``: one row per tissue tile: its level-0 box, tissue fraction, predicted class
  and ``p_<class>`` columns (as ``breastvision predict`` writes them).
- ``<slide>_tiles.geojson``: a FeatureCollection of tile Polygons in level-0 pixel coordinates
  (origin top-left, as QuPath expects), each with ``objectType: tile``, a ``classification``
  ``{name, color}`` (the predicted class) and ``measurements`` (the probabilities and the tissue
  fraction), which QuPath's *File → Import objects from file* reads.
- ``<slide>_heatmap.png``: the thumbnail with each tissue tile coloured by p(positive class).
- ``<slide>_summary.json``: the slide, the model, the tiling, the slide-level score (with its
  aggregation spelt out), counts and throughput.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from breastvision.slide.predict import SlideRun

#: Classification colours (RGB) for QuPath; other classes get tab10 colours.
CLASS_COLORS = {"malignant": (200, 0, 0), "benign": (0, 150, 0), "normal": (0, 90, 200)}
#: Heat-map colour map and opacity over the tissue.
HEATMAP_CMAP, HEATMAP_ALPHA = "inferno", 0.55
#: Pixels below the overlay for the colour bar.
LEGEND_HEIGHT = 28


def _stem(run: SlideRun) -> str:
    return Path(run.name).stem


def class_color(name: str, index: int) -> list[int]:
    if name in CLASS_COLORS:
        return list(CLASS_COLORS[name])
    from matplotlib import colormaps

    return [round(255 * c) for c in colormaps["tab10"](index % 10)[:3]]


def write_tiles_csv(run: SlideRun, path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["column", "row", "x", "y", "width", "height", "tissue_fraction", "predicted",
                         *(f"p_{c}" for c in run.class_names)])
        for tile, probs in zip(run.grid.tiles, run.probabilities, strict=True):
            box = [tile.column, tile.row, tile.x, tile.y, tile.width, tile.height, f"{tile.tissue:.4f}"]
            writer.writerow([*box, run.class_names[int(np.argmax(probs))], *(f"{p:.6f}" for p in probs)])
    return path


def geojson_document(run: SlideRun) -> dict[str, Any]:
    colors = {c: class_color(c, i) for i, c in enumerate(run.class_names)}
    features = []
    for tile, probs in zip(run.grid.tiles, run.probabilities, strict=True):
        x0, y0, x1, y1 = tile.x, tile.y, tile.x + tile.width, tile.y + tile.height
        ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
        predicted = run.class_names[int(np.argmax(probs))]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "tile",
                "classification": {"name": predicted, "color": colors[predicted]},
                "measurements": {**{f"p_{c}": float(p) for c, p in zip(run.class_names, probs, strict=True)},
                                 "tissue_fraction": tile.tissue},
            },
        })
    return {"type": "FeatureCollection", "features": features}


def write_heatmap(run: SlideRun, positive: str, path: Path, max_side: int) -> Path:
    """The thumbnail, at most ``max_side`` pixels, with tissue tiles coloured by p(``positive``)."""
    from matplotlib import colormaps

    thumb = run.thumbnail
    scale = min(1.0, max_side / max(thumb.size))
    size = (max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale)))
    base = thumb.resize(size, Image.Resampling.BILINEAR) if scale < 1 else thumb.copy()
    fx, fy = run.thumbnail_downsample[0] / scale, run.thumbnail_downsample[1] / scale
    heat = np.zeros((size[1], size[0], 4), np.uint8)
    colors = colormaps[HEATMAP_CMAP](run.probabilities[:, run.class_names.index(positive)], bytes=True)
    for tile, color in zip(run.grid.tiles, colors, strict=True):
        x0, y0 = round(tile.x / fx), round(tile.y / fy)
        x1, y1 = round((tile.x + tile.width) / fx), round((tile.y + tile.height) / fy)
        heat[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)] = (*color[:3], round(255 * HEATMAP_ALPHA))
    overlay = Image.alpha_composite(base.convert("RGBA"), Image.fromarray(heat, "RGBA")).convert("RGB")
    _with_legend(overlay, f"p({positive})").save(path)
    return path


def _with_legend(image: Image.Image, label: str) -> Image.Image:
    """``image`` above a colour bar of the heat-map's scale, 0 on the left and 1 on the right."""
    from matplotlib import colormaps
    from PIL import ImageDraw

    bar = np.linspace(0, 1, max(image.width // 2, 2))
    canvas = Image.new("RGB", (image.width, image.height + LEGEND_HEIGHT), "white")
    canvas.paste(image, (0, 0))
    strip = colormaps[HEATMAP_CMAP](np.tile(bar, (10, 1)), bytes=True)[..., :3]
    left = image.width // 4
    canvas.paste(Image.fromarray(np.ascontiguousarray(strip)), (left, image.height + 4))
    draw = ImageDraw.Draw(canvas)
    y = image.height + 15
    draw.text((left - 12, y - 11), "0", fill="black")
    draw.text((left + len(bar) + 4, y - 11), "1", fill="black")
    draw.text((left, y), f"{label}, tissue tiles; glass and edge tiles uncoloured", fill="black")
    return canvas


def write_outputs(run: SlideRun, out_dir: Path, summary: dict[str, Any], positive: str,
                  heatmap_side: int) -> dict[str, str]:
    """Write the four files of one slide; returns their paths by kind (also put in the summary)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _stem(run)
    files = {
        "tiles_csv": write_tiles_csv(run, out_dir / f"{stem}_tiles.csv"),
        "geojson": out_dir / f"{stem}_tiles.geojson",
        "heatmap": write_heatmap(run, positive, out_dir / f"{stem}_heatmap.png", heatmap_side),
        "summary": out_dir / f"{stem}_summary.json",
    }
    files["geojson"].write_text(json.dumps(geojson_document(run)) + "\n")
    paths = {k: str(v) for k, v in files.items()}
    files["summary"].write_text(json.dumps({**summary, "files": paths}, indent=2) + "\n")
    return paths
