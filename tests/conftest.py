"""Shared fixtures: the real data root (tests skip cleanly without it) and small generated images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

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
