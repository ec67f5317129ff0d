"""A disk cache of stain-normalised images, so a data set is normalised once, not every epoch.

Each normalised image is a lossless PNG at ``<cache dir>/<normaliser hash>/<k[:2]>/<k>.png``, where
the key ``k`` hashes the source file's resolved path, modification time (ns) and size: an edited or
replaced source misses, and a different normaliser (another method, reference or parameter) lives
in another directory, so stale entries are never served and a whole normaliser's cache can be
deleted at once. ``state.json`` in that directory records which normaliser wrote it, and an empty
``<k>.fallback`` beside an entry marks a tile stored unnormalised (too little tissue).

The cache directory is ``$BREASTVISION_CACHE/stain`` when that variable is set (the root all
breastvision caches share), else ``~/.cache/breastvision/stain``. Writes go to a temporary file in
the target directory and are renamed into place, which is atomic on POSIX and Windows: concurrent
workers or processes normalising the same image each write a complete file and the last rename wins.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image

from breastvision.data.dicom import split_frame
from breastvision.data.io import BadImageError, load_image
from breastvision.data.stain import StainNormalizer

ENV_VAR = "BREASTVISION_CACHE"
#: An empty file beside an entry whose image was stored unnormalised (too little tissue).
_FALLBACK_SUFFIX = ".fallback"


def default_cache_dir() -> Path:
    """Where normalised images go unless a cache directory is given (see the module docstring)."""
    root = os.environ.get(ENV_VAR)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "breastvision"
    return base / "stain"


def _atomic_write(target: Path, write: Callable[[IO[bytes]], object]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Hidden and suffixed ".tmp" so that no reader ever mistakes a half-written file for an entry.
    handle = tempfile.NamedTemporaryFile(dir=target.parent, prefix=".", suffix=".tmp", delete=False)
    try:
        with handle:
            write(handle)
        os.replace(handle.name, target)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


class NormalizedImageCache:
    """Stain-normalised copies of image files, computed in batches on ``device`` on first request.

    ``hits`` and ``misses`` count requests served from disk and images normalised;
    ``left_unnormalized`` lists the tiles stored unnormalised for lack of tissue.
    """

    def __init__(
        self,
        normalizer: StainNormalizer,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
    ) -> None:
        self.normalizer = normalizer
        self.dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.dir = self.dir / normalizer.state_hash[:16]
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.hits = 0
        self.misses = 0

    def path_for(self, source: str | os.PathLike) -> Path:
        """Where the normalised copy of ``source`` is (or will be) stored."""
        path = Path(source).resolve()
        try:
            stat = split_frame(path)[0].stat()  # a DICOM frame: its file's
        except OSError as err:
            raise BadImageError(f"cannot be read ({err.strerror})", path) from None
        key = hashlib.sha256(f"{path}\0{stat.st_mtime_ns}\0{stat.st_size}".encode()).hexdigest()[:32]
        return self.dir / key[:2] / f"{key}.png"

    def ensure(
        self, sources: Sequence[str | os.PathLike], on_image: Callable[[], object] | None = None
    ) -> list[Path]:
        """The cached normalised file of each source, normalising (in batches) those not cached yet;
        ``on_image`` is called once per source not cached, as it is read (progress bars).

        Returns paths rather than images so that a whole data set can be prepared without holding
        it in memory; datasets then read the returned files with ``data.io.load_image``.
        """
        targets = [self.path_for(s) for s in sources]
        missing = [i for i, t in enumerate(targets) if not t.is_file()]
        self.hits += len(targets) - len(missing)
        self.misses += len(missing)
        if missing:
            self._write_state()
        # Same-sized images share a batch: one tensor, one pass of the batched normaliser.
        by_size: dict[tuple[int, int], list[tuple[int, Image.Image]]] = defaultdict(list)
        for i in missing:
            if on_image is not None:
                on_image()
            image = load_image(sources[i])
            group = by_size[image.size]
            group.append((i, image))
            if len(group) == self.batch_size:
                self._normalize_and_write(group, targets)
                group.clear()
        for group in by_size.values():
            if group:
                self._normalize_and_write(group, targets)
        return targets

    def left_unnormalized(self, sources: Sequence[str | os.PathLike]) -> list[Path]:
        """The sources (already cached) that were stored unnormalised for lack of tissue.

        Read from the cache, so a report can count them even when an earlier run did the work and
        this run's normaliser saw none of them.
        """
        return [Path(s) for s in sources if self.path_for(s).with_suffix(_FALLBACK_SUFFIX).is_file()]

    def get(self, source: str | os.PathLike) -> Image.Image:
        """The stain-normalised RGB image of one file."""
        return load_image(self.ensure([source])[0])

    def _normalize_and_write(self, group: list[tuple[int, Image.Image]], targets: list[Path]) -> None:
        batch = torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for _, image in group])
        normalized, fallback = self.normalizer.transform(batch.to(self.device), return_fallback=True)
        for (i, _), pixels, unchanged in zip(
            group, normalized.permute(0, 2, 3, 1).cpu().numpy(), fallback.tolist(), strict=True
        ):
            if unchanged:  # marked before the image exists, so every complete entry is marked right
                targets[i].parent.mkdir(parents=True, exist_ok=True)
                targets[i].with_suffix(_FALLBACK_SUFFIX).touch()
            # Low compression: the cache trades disk for the speed of a first epoch.
            image = Image.fromarray(pixels)
            _atomic_write(targets[i], lambda fh, im=image: im.save(fh, "PNG", compress_level=1))

    def _write_state(self) -> None:
        state_file = self.dir / "state.json"
        if not state_file.is_file():
            text = json.dumps(self.normalizer.state_dict(), indent=1).encode()
            _atomic_write(state_file, lambda fh: fh.write(text))
