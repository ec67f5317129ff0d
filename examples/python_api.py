"""The breastvision Python API in one script: train from a config, load the model file, predict on
a path / PIL image / array / folder, explain with Grad-CAM, evaluate with bootstrap intervals.

    python examples/python_api.py                 # a tiny demo: generated images, a tiny model (seconds)
    python examples/python_api.py MODEL FOLDER    # your model file and a folder of class sub-folders

Everything it writes goes under ``--out`` (default ``runs/python_api_example``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

import breastvision

TINY_CONFIG = """\
name: python_api_demo
data:
  source: {source}
  input_size: 32
  split: {{protocol: group_holdout, options: {{fractions: [0.5, 0.25, 0.25]}}}}
model: {{name: resnet18, first_trainable_stage: layer4}}
train: {{epochs: 1, batch_size: 4, cache_dir: null, progress: none}}
"""


def demo_data(folder: Path) -> Path:
    """Two classes of small generated images, one tint per class, as class sub-folders."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(("benign", "malignant")):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(8):
            pixels = rng.integers(0, 160, (40, 40, 3), dtype=np.uint8)
            pixels[..., label] += 95
            Image.fromarray(pixels).save(folder / name / f"{name}_{i}.png")
    return folder


def train_demo(out: Path) -> tuple[Path, Path]:
    """Train a tiny model from a YAML config with ``breastvision.train``; returns (model, data)."""
    data = demo_data(out / "demo_data")
    config = out / "demo.yaml"
    config.write_text(TINY_CONFIG.format(source=data.resolve()))
    run = breastvision.train(config, ["train.seed=0"], out=out / "demo_run")  # a RunRecord
    print(f"trained: test accuracy {run.metrics['accuracy']:.3f}, model file {run.model_file}")
    return run.model_file, data


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", type=Path, help="model file (.safetensors)")
    parser.add_argument("folder", nargs="?", type=Path, help="folder of class sub-folders of images")
    parser.add_argument("--out", type=Path, default=Path("runs/python_api_example"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model_file, folder = (args.model, args.folder) if args.model else train_demo(args.out)
    if folder is None:
        parser.error("give FOLDER with MODEL")

    model = breastvision.load_model(model_file)
    print(f"classes: {model.class_names}")
    image_path = next(p for p in sorted(folder.rglob("*")) if p.suffix.lower() in {".png", ".jpg", ".jpeg"})

    by_path = model.predict(image_path)  # a file path ...
    by_image = model.predict(Image.open(image_path))  # ... a PIL image ...
    by_array = model.predict(np.asarray(Image.open(image_path).convert("RGB")))  # ... or an H×W×3 array
    assert by_path.label == by_image.label == by_array.label  # one pre-processing for all three
    print(f"{image_path.name}: {by_path.label} {by_path.probabilities}")

    run = model.predict_folder(folder)  # every image below, bad files listed, not fatal
    print(f"folder: {len(run.predictions)} predicted, {len(run.skipped)} skipped")

    explanation = model.explain(image_path)  # Grad-CAM for the predicted class
    explanation.overlay.save(args.out / "explanation.png")
    print(f"heat-map of '{explanation.label}': {args.out / 'explanation.png'}")

    evaluation = model.evaluate(str(folder), out=args.out / "evaluation", n_resamples=200)
    print(f"accuracy on {evaluation.n_images} images: {evaluation.metrics['accuracy']:.3f}, "
          f"report {evaluation.report}")


if __name__ == "__main__":
    main()
