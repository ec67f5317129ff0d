"""Shared fixtures: the real data root (tests skip cleanly without it) and small generated images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests use tiny inputs: one thread is as fast, and immune to oversubscription when cores are busy.
torch.set_num_threads(1)

_REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    env = os.environ.get("BREASTVISION_DATA")
    return Path(env) if env else _REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _shared_data()
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set BREASTVISION_DATA)")
    return root


def _dataset(root: Path, rel: str) -> Path:
    path = root / rel
    if not path.exists():
        pytest.skip(f"{path} absent")
    return path


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory: pytest.TempPathFactory):
    """Factory of class-per-folder trees of small random RGB PNGs, one tint per class (so a tiny
    model has something to learn), cached per arguments."""
    import numpy as np
    from PIL import Image

    made: dict[tuple, Path] = {}

    def make(classes: tuple[str, ...] = ("benign", "malignant"), per_class: int = 8,
             size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
        key = (classes, per_class, size, seed)
        if key not in made:
            root = tmp_path_factory.mktemp("images")
            rng = np.random.default_rng(seed)
            for label, name in enumerate(classes):
                (root / name).mkdir()
                for i in range(per_class):
                    pixels = rng.integers(0, 160, (size[1], size[0], 3), dtype=np.uint8)
                    pixels[..., label % 3] += 95
                    Image.fromarray(pixels).save(root / name / f"{name}_{i:02d}.png")
            made[key] = root
        return made[key]

    return make


@pytest.fixture(scope="session")
def busi_dir(data_root: Path) -> Path:
    return _dataset(data_root, "busi/Dataset_BUSI_with_GT")


@pytest.fixture(scope="session")
def breakhis_dir(data_root: Path) -> Path:
    return _dataset(data_root, "breakhis_200x_224")


@pytest.fixture(scope="session")
def breakhis_samples_dir(data_root: Path) -> Path:
    return _dataset(data_root, "breakhis_samples")


@pytest.fixture(scope="session")
def lc25000_dir(data_root: Path) -> Path:
    return _dataset(data_root, "lc25000/lung_image_sets")


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    path = _REPO.parent / "shared" / "weights"
    if not path.is_dir():
        pytest.skip(f"shared weights not found at {path}")
    return path


@pytest.fixture(scope="session")
def make_model_file(tmp_path_factory: pytest.TempPathFactory):
    """Factory of model files with random weights, cached per arguments: tests of *using* a model
    (predict, export, serve, explain) check the plumbing, not accuracy."""
    from breastvision.models.bundle import ModelBundle, Preprocessing
    from breastvision.models.registry import create_model

    made: dict[str, Path] = {}

    def make(architecture: str = "resnet18", input_size: int = 64, resize: int | None = None,
             stain: dict | None = None, class_names: tuple[str, ...] = ("benign", "malignant", "normal"),
             mpp: tuple[float, float] | None = None, **model_kwargs) -> Path:
        key = repr((architecture, input_size, resize, stain, class_names, mpp, sorted(model_kwargs.items())))
        if key not in made:
            torch.manual_seed(0)
            model = create_model(architecture, num_classes=len(class_names), **model_kwargs)
            bundle = ModelBundle(
                architecture, list(class_names), model.state_dict(), model_kwargs=model.model_kwargs,
                preprocessing=Preprocessing(input_size=input_size, resize=resize, stain=stain, mpp=mpp),
                lineage=[{"stage": "random init", "weights": "random", "data": "none"}],
                metrics={"val": {"accuracy": 0.5, "macro_recall": 0.4}},
            )
            made[key] = bundle.save(tmp_path_factory.mktemp("model") / f"{architecture}.safetensors")
        return made[key]

    return make
