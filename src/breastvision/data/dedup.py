"""Near-duplicate groups by perceptual hashing, so that copies of one scan never straddle a split.

BUSI holds the same scan more than once (sometimes under two labels, Pawłowska et al. 2023) and
several frames of one lesion a moment apart. Both leak if split apart, so they form one group.

Choice of hash and threshold, measured on the 623 BUSI images in ``../shared/data`` and checked by
eye on every pair near the boundary:

- Two 64-bit hashes from ``imagehash``: pHash (DCT, robust to brightness/contrast and mild
  resampling) and dHash (gradients, sensitive to structure). pHash alone cannot separate frames of
  one lesion (pHash distance 10–14) from unrelated scans of similar tissue (from 10 up); adding
  dHash does, because the unrelated pairs there all differ in 16 or more dHash bits.
- Two images are near-duplicates when **pHash distance ≤ 14 and dHash distance ≤ 15**
  (:data:`PHASH_MAX`, :data:`DHASH_MAX`). Every pair accepted on BUSI was the same scan, a re-export
  with or without calipers / Doppler overlay, or an adjacent frame of the same lesion; no rejected
  pair inspected was. Groups are the connected components of that relation (single linkage), so a
  sequence of frames becomes one group even when its ends differ more.
- Hashes are cached in ``cache_dir()/imagehash-v1.json`` keyed by absolute path, size and
  modification time, so only new or changed files are decoded again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import imagehash
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from breastvision.data.dicom import split_frame
from breastvision.data.io import BadImageError, load_image
from breastvision.data.records import Record, Skipped
from breastvision.paths import cache_dir

log = logging.getLogger(__name__)

PHASH_MAX = 14
DHASH_MAX = 15
CACHE_NAME = "imagehash-v1.json"
#: Prefix of the ``Record.group`` of a near-duplicate group with more than one image.
GROUP_PREFIX = "near-dup:"


@dataclass(frozen=True)
class ImageHashes:
    """The two 64-bit perceptual hashes of one image, as 16-digit hex strings."""

    phash: str
    dhash: str


class HashCache:
    """A JSON file of hashes (or decoding errors) keyed by absolute path, size and mtime."""

    def __init__(self, path: Path | None):
        self.path = path
        self._entries: dict[str, dict] = {}
        self._dirty = False
        if path is not None and path.is_file():
            try:
                self._entries = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                log.warning("ignoring unreadable hash cache %s (%s)", path, err)

    @staticmethod
    def _key(path: Path) -> tuple[str, int, int]:
        stat = split_frame(path)[0].stat()  # a DICOM frame: its file's
        return str(path.resolve()), stat.st_size, stat.st_mtime_ns

    def get(self, path: Path) -> ImageHashes | str | None:
        """Cached hashes, the cached error message, or None when absent or stale."""
        key, size, mtime = self._key(path)
        entry = self._entries.get(key)
        if not entry or entry.get("size") != size or entry.get("mtime_ns") != mtime:
            return None
        if "error" in entry:
            return entry["error"]
        return ImageHashes(entry["phash"], entry["dhash"])

    def put(self, path: Path, value: ImageHashes | str) -> None:
        key, size, mtime = self._key(path)
        entry: dict = {"size": size, "mtime_ns": mtime}
        if isinstance(value, str):
            entry["error"] = value
        else:
            entry.update(phash=value.phash, dhash=value.dhash)
        self._entries[key] = entry
        self._dirty = True

    def save(self) -> None:
        """Write atomically; a cache that cannot be written only costs time on the next run."""
        if self.path is None or not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._entries))
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError as err:
            log.warning("could not write hash cache %s (%s)", self.path, err)


def default_cache() -> HashCache:
    return HashCache(cache_dir() / CACHE_NAME)


def hash_image(path: Path) -> ImageHashes:
    """pHash and dHash of one image; raises ``BadImageError`` for a bad file."""
    grey = load_image(path).convert("L")
    return ImageHashes(str(imagehash.phash(grey)), str(imagehash.dhash(grey)))


def hash_images(paths: Iterable[Path], cache: HashCache | None = None) -> dict[Path, ImageHashes | str]:
    """Hashes of every path, or the reason it could not be decoded; cached results are reused."""
    cache = cache if cache is not None else HashCache(None)
    result: dict[Path, ImageHashes | str] = {}
    for path in paths:
        value = cache.get(path)
        if value is None:
            try:
                value = hash_image(path)
            except BadImageError as err:
                value = err.reason
            cache.put(path, value)
        result[path] = value
    cache.save()
    return result


def _bits(hexes: Sequence[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hexes], dtype=np.uint64)


def _close_pairs(values: np.ndarray, limit: int, block: int = 1024) -> set[tuple[int, int]]:
    """Index pairs (i < j) whose Hamming distance is at most ``limit``; row blocks bound memory."""
    pairs: set[tuple[int, int]] = set()
    for start in range(0, len(values), block):
        distance = np.bitwise_count(values[start : start + block, None] ^ values[None, :])
        rows, cols = np.nonzero(distance <= limit)
        rows += start
        pairs.update((int(i), int(j)) for i, j in zip(rows, cols, strict=True) if i < j)
    return pairs


def near_duplicate_components(
    hashes: Sequence[ImageHashes], phash_max: int = PHASH_MAX, dhash_max: int = DHASH_MAX
) -> np.ndarray:
    """A component label per image: images linked by a chain of near-duplicate pairs share one."""
    n = len(hashes)
    if n == 0:
        return np.zeros(0, dtype=int)
    pairs = _close_pairs(_bits([h.phash for h in hashes]), phash_max)
    pairs &= _close_pairs(_bits([h.dhash for h in hashes]), dhash_max)
    rows = np.array([i for i, _ in pairs], dtype=int)
    cols = np.array([j for _, j in pairs], dtype=int)
    graph = coo_matrix((np.ones(len(pairs)), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def group_near_duplicates(
    records: Sequence[Record], root: Path, class_names: Sequence[str], cache: HashCache | None = None
) -> tuple[list[Record], list[Skipped], dict]:
    """Set each record's group to its near-duplicate group; undecodable images become skips.

    A group of one keeps the image's relative path as its id; a larger group is named
    ``near-dup:<first relative path>``. Returns the records, the skips, and a summary with the
    groups and the **label conflicts** (near-duplicate groups holding more than one label).
    """
    hashes = hash_images((r.path for r in records), cache if cache is not None else default_cache())
    good = [r for r in records if isinstance(hashes[r.path], ImageHashes)]
    skipped = [Skipped(r.path, str(hashes[r.path])) for r in records if isinstance(hashes[r.path], str)]
    labels = near_duplicate_components([hashes[r.path] for r in good])
    members: dict[int, list[Record]] = {}
    for record, component in zip(good, labels, strict=True):
        members.setdefault(int(component), []).append(record)

    def rel(record: Record) -> str:
        return record.path.relative_to(root).as_posix()

    regrouped: dict[Path, Record] = {}
    groups, conflicts = [], []
    for group in members.values():
        names = sorted(rel(r) for r in group)
        gid = names[0] if len(group) == 1 else GROUP_PREFIX + names[0]
        for record in group:
            regrouped[record.path] = replace(record, group=gid)
        if len(group) > 1:
            groups.append(names)
            if len({r.label for r in group}) > 1:
                conflicts.append({"group": gid, "files": {rel(r): class_names[r.label] for r in group}})
    info = {
        "method": f"pHash ≤ {PHASH_MAX} and dHash ≤ {DHASH_MAX} bits (64-bit imagehash), single linkage",
        "groups": sorted(groups),
        "label_conflicts": sorted(conflicts, key=lambda c: c["group"]),
    }
    return [regrouped[r.path] for r in good], skipped, info
