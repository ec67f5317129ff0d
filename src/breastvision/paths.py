"""Where data lives: ``--data DIR``, else ``$BREASTVISION_DATA``, else ``../shared/data``, else ``./data``."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from breastvision.errors import DatasetNotFoundError

ENV_VAR = "BREASTVISION_DATA"

#: Official places to obtain each dataset, named in "not found" errors.
DATASET_SOURCES: dict[str, str] = {
    "busi": "https://scholar.cu.edu.eg/?q=afahmy/pages/dataset (Al-Dhabyani et al. 2020, CC BY 4.0)",
    "breakhis": "https://web.inf.ufpr.br/vri/databases/breast-cancer-histopathological-database-breakhis/",
    "lc25000": "https://github.com/tampapath/lung_colon_image_set (Borkowski et al. 2019)",
}

#: Where each dataset sits below the data root, in the layout of ``../shared/data``.
DATASET_DIRS: dict[str, str] = {
    "busi": "busi/Dataset_BUSI_with_GT",
    "breakhis": "breakhis_200x_224",
    "breakhis_samples": "breakhis_samples",
    "lc25000": "lc25000/lung_image_sets",
}


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """The data root, by the precedence in this module's docstring."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    shared = Path.cwd().parent / "shared" / "data"
    if shared.is_dir():
        return shared
    return Path("data")


def dataset_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """The folder of a named dataset; a clear error naming where it looked and where to get it."""
    base = data_root(root)
    path = base / DATASET_DIRS[name]
    if not path.exists():
        source = DATASET_SOURCES.get(name.split("_")[0], "see the README")
        raise DatasetNotFoundError(
            f"dataset '{name}' not found at {path} (data root {base}, set by --data or ${ENV_VAR}); "
            f"obtain it from {source}"
        )
    return path


#: The shipped configs (package data; the repository's ``configs/`` links here).
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


def config_path(path: str | os.PathLike) -> Path:
    """``path`` if it exists, else the shipped config of that file name (so ``configs/x.yaml``
    from the README works from any folder, and from an installed package); else ``path``, which the
    reader reports as not found."""
    given = Path(path).expanduser()
    shipped = CONFIGS_DIR / given.name
    return shipped if not given.exists() and shipped.is_file() else given


CACHE_ENV_VAR = "BREASTVISION_CACHE"


def cache_dir() -> Path:
    """Where derived, re-computable files (image hashes) are kept: ``$BREASTVISION_CACHE``, else
    ``$XDG_CACHE_HOME/breastvision``, else ``~/.cache/breastvision``. Deleting it is always safe."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "breastvision"


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in blocks (model files can be hundreds of MB): what reports and
    model cards use to say exactly which file (weights, model, split) a result came from."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def printable(name: str | os.PathLike) -> str:
    """A file name as text any UTF-8 file or terminal can hold: bytes that are not valid UTF-8 (which
    Python decodes to lone surrogates, and a UTF-8 writer then refuses) become ``\\xNN``, Python's
    own escape; everything else is unchanged. Every CSV and JSON file that lists paths uses it."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")
