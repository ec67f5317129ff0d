"""How well a model file's out-of-scope flag (``models.scope``) separates its own test images from
other domains: AUROC of the scope score (in-distribution test images = 0, off-domain = 1), the share
of in-distribution test images flagged (the false-flag rate) and of each off-domain set flagged.

The in-distribution images are the run's test images (its ``predictions.csv``, paths relative to
``--root``). Off-domain sets are ``NAME=FOLDER`` pairs (a seeded sample of ``--per-set`` images of
each, found as ``predict`` finds them) and ``photos``: natural photographs bundled with libraries
(the two of ``imagenet_samples``, scikit-image's ``skimage.data`` colour photos and matplotlib's
``grace_hopper.jpg``). Prints one JSON document.

``--refit FILE`` first writes a copy of the run's model file with its scope fitted afresh by this
release on the run's own training and validation images (``training.scope.refit_scope``) and measures
that copy: the same weights, so a scope method is compared with another on one model.

    .venv/bin/python bench/bench_ood.py runs/ood_busi --root ../shared/data/busi/Dataset_BUSI_with_GT \\
        --ood lc25000=../shared/data/lc25000 breakhis=../shared/data/breakhis_200x_224
    .venv/bin/python bench/bench_ood.py runs/ood_breakhis --root ../shared/data/breakhis_200x_224 \\
        --ood lc25000=../shared/data/lc25000 busi=../shared/data/busi/Dataset_BUSI_with_GT
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from breastvision.data.io import load_image
from breastvision.serving.predict import batched, discover_images, load_predictor

#: ``skimage.data``'s bundled photographs (no download; its microscopy and drawings are left out).
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket")


def natural_photos(folder: Path, imagenet: Path) -> list[Path]:
    """The natural photographs named in the module docstring, written into ``folder``."""
    import matplotlib
    from PIL import Image
    from skimage import data

    paths = sorted(p for p in imagenet.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    paths += [hopper] if hopper.is_file() else []
    for name in PHOTOS:
        out = folder / f"skimage_{name}.png"
        Image.fromarray(getattr(data, name)()).save(out)
        paths.append(out)
    return paths


def scores(predictor, paths: list[Path]) -> np.ndarray:
    out = []
    for batch in batched(paths, 16):
        tensors = torch.stack([predictor.preprocess(load_image(p)) for p in batch])
        out.append(predictor.assess(tensors)[1])
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run folder: model.safetensors and predictions.csv")
    parser.add_argument("--root", type=Path, required=True, help="the dataset folder of predictions.csv")
    parser.add_argument("--ood", nargs="*", default=[], help="NAME=FOLDER off-domain sets")
    parser.add_argument("--imagenet", type=Path, default=Path("../shared/data/imagenet_samples"))
    parser.add_argument("--per-set", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refit", type=Path, help="measure a copy with a freshly fitted scope, written here")
    args = parser.parse_args()

    model_file = args.run / "model.safetensors"
    if args.refit:
        from breastvision.training.scope import refit_scope

        model_file = refit_scope(args.run, args.refit)
    predictor = load_predictor(model_file)
    if predictor.info.scope is None:
        raise SystemExit(f"{model_file} has no scope: retrain it with this release, or pass --refit FILE")
    with (args.run / "predictions.csv").open(newline="") as handle:
        test = [args.root / row["path"] for row in csv.DictReader(handle)]
    in_scores = scores(predictor, test)
    threshold = predictor.info.scope.threshold
    report = {"model": str(model_file), "layers": predictor.info.scope.layer_names, "threshold": threshold,
              "in_distribution_test": len(test),
              "false_flag_rate": float(np.mean(in_scores > threshold)), "pairs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        sets = {"photos": natural_photos(Path(tmp), args.imagenet)}
        for pair in args.ood:
            name, folder = pair.split("=", 1)
            images = [path for path, _ in discover_images([folder]).images]
            sets[name] = random.Random(args.seed).sample(images, min(args.per_set, len(images)))
        for name, paths in sets.items():
            far = scores(predictor, paths)
            labels = np.r_[np.zeros(len(in_scores)), np.ones(len(far))]
            auroc = float(roc_auc_score(labels, np.r_[in_scores, far]))
            flagged = float(np.mean(far > threshold))
            report["pairs"][name] = {"images": len(paths), "auroc": auroc, "flagged": flagged}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
