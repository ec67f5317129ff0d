"""Where a model's starting weights come from, loading them, and saying so.

A weights spec is ``None`` (random init), ``"imagenet"`` (the library-standard ImageNet weights:
torchvision's from the torch hub cache, timm's from the Hugging Face cache, downloaded the usual way
where a network is reachable) or a local file (safetensors, or a ``.pth``/``.pt``/``.bin``/``.ckpt``
read with ``weights_only=True``; a breastvision model file from an earlier training stage works too).

Every built model carries ``weights_origin``: which weights each part started from, with the file
and its SHA-256, so a report can state exactly what a run began with. With
``$BREASTVISION_OFFLINE`` or ``$HF_HUB_OFFLINE`` set nothing is ever downloaded: missing ImageNet
weights fail at once with a message naming the file to place and where.
"""

from __future__ import annotations

import functools
import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from breastvision import paths
from breastvision.errors import BreastvisionError, one_line
from breastvision.models.masking import MASK_HEAD_KEYS

RANDOM_INIT = "random init"
OFFLINE_ENV = "BREASTVISION_OFFLINE"
_TORCH_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt"}
#: Checkpoint wrappers seen in the wild (Lightning, DeiT-style, plain training scripts).
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")

WeightsSpec = str | os.PathLike | None
StateDict = dict[str, torch.Tensor]
#: ``() -> (state_dict, description)``: how one architecture gets its ImageNet weights.
ImagenetLoader = Callable[[], tuple[StateDict, str]]


def is_offline() -> bool:
    """Whether downloads are forbidden (``$BREASTVISION_OFFLINE`` or ``$HF_HUB_OFFLINE`` truthy)."""
    return any(
        os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}
        for var in (OFFLINE_ENV, "HF_HUB_OFFLINE")
    )


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return paths.file_sha256(path)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, memoised on (path, size, mtime) since weight files are hashed repeatedly."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def describe_file(path: str | os.PathLike) -> str:
    return f"{Path(path).resolve()} (sha256 {file_sha256(path)})"


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """A state dict from a local weights file, floating tensors as float32 (float16 files exist)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BreastvisionError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw: object = _model_weights(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as err:
            raise BreastvisionError(f"cannot read weights file {path}: {one_line(err)}") from None
    elif suffix in _TORCH_SUFFIXES:
        raw = load_torch_file(path, "weights file")
    else:
        raise BreastvisionError(
            f"{path}: unsupported weights file type '{suffix}' (use .safetensors, .pth, .pt, .bin, .ckpt)"
        )
    for key in _WRAPPER_KEYS:
        if isinstance(raw, Mapping) and isinstance(raw.get(key), Mapping):
            raw = raw[key]
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise BreastvisionError(f"{path} does not hold a state dict of tensors")
    # Distributed training saves keys as ``module.<name>``.
    strip = all(k.startswith("module.") for k in raw)
    return {
        (k[len("module.") :] if strip else k): (v.float() if v.is_floating_point() else v)
        for k, v in raw.items()
    }


def _model_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A breastvision model file's weights without its out-of-scope statistics (``scope.*``, saved
    beside the weights), so a run's model file can start the next stage of a transfer chain."""
    from breastvision.models.scope import SCOPE_PREFIX

    return {k: v for k, v in tensors.items() if not k.startswith(SCOPE_PREFIX)}


def load_torch_file(path: Path, what: str = "checkpoint") -> object:
    """``torch.load`` with ``weights_only=True`` pinned (tensors and plain containers only: never
    code, whatever the installed torch's default), every failure a one-line ``BreastvisionError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = re.search(r"GLOBAL (\S+)", str(err))
        detail = f" ({blocked.group(0)})" if blocked else f": {one_line(err, 120)}"
        raise BreastvisionError(
            f"{what} {path} holds objects that weights-only loading refuses{detail}: only tensors and "
            "plain containers are read, since unpickling anything else could run code"
        ) from None
    except Exception as err:  # any reader failure (truncation, not a zip/pickle, bad records) is a bad file
        reason = one_line(err, 120) or type(err).__name__
        message = f"cannot read {what} {path}: truncated or not a PyTorch file ({reason})"
        raise BreastvisionError(message) from None


def resolve(spec: WeightsSpec, imagenet: ImagenetLoader | None, what: str) -> tuple[StateDict | None, str]:
    """The state dict a spec names and its description, or ``(None, "random init")``."""
    if spec is None:
        return None, RANDOM_INIT
    if str(spec).strip().lower() == "imagenet":
        if imagenet is None:
            raise BreastvisionError(f"no ImageNet weights are known for {what}; pass a weights file instead")
        return imagenet()
    return read_state_dict(spec), f"file: {describe_file(Path(spec).expanduser())}"


def _unavailable(what: str, filename: str, folder: Path | str, source: str, err: Exception | None) -> str:
    why = f" ({type(err).__name__}: {err})" if err else " (offline)"
    return (
        f"ImageNet weights for {what} are not available here{why}: place {filename} from {source} "
        f"in {folder}, or pass a local weights file as pretrained=PATH"
    )


def torchvision_imagenet(arch: str) -> ImagenetLoader:
    """Loader of torchvision's default ImageNet weights for ``arch``, from the torch hub cache.

    Going through ``torchvision.models.get_model(arch, weights=...)`` keeps torchvision's own
    key fix-ups (old DenseNet checkpoints, GoogLeNet's auxiliary heads) in torchvision's hands.
    """

    def load() -> tuple[StateDict, str]:
        import torchvision

        weights = torchvision.models.get_model_weights(arch).DEFAULT
        filename = Path(weights.url).name
        cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if not cached.is_file() and is_offline():
            raise BreastvisionError(_unavailable(arch, filename, cached.parent, weights.url, None))
        try:
            state = torchvision.models.get_model(arch, weights=weights).state_dict()
        except OSError as err:  # URLError and friends: no network, no file
            raise BreastvisionError(_unavailable(arch, filename, cached.parent, weights.url, err)) from err
        return state, f"imagenet: torchvision {weights} ({describe_file(cached)})"

    return load


def timm_imagenet(timm_name: str) -> ImagenetLoader:
    """Loader of timm's default pretrained weights for ``timm_name``, from the Hugging Face cache."""

    def load() -> tuple[StateDict, str]:
        from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(timm_name)
        repo = cfg.hf_hub_id if cfg is not None else None
        if not repo:
            raise BreastvisionError(f"timm has no downloadable weights for {timm_name}; pass a weights file")
        filenames = ("model.safetensors", "pytorch_model.bin")
        cached = [try_to_load_from_cache(repo, name) for name in filenames]
        path = next((p for p in cached if isinstance(p, str)), None)
        if path is None:
            source = f"the Hugging Face repo {repo}"
            folder = f"the Hugging Face cache {constants.HF_HUB_CACHE} (e.g. `hf download {repo}`)"
            if is_offline():
                raise BreastvisionError(_unavailable(timm_name, filenames[0], folder, source, None))
            try:
                path = hf_hub_download(repo, filenames[0])
            except OSError as err:  # every huggingface_hub network/cache error is an OSError
                raise BreastvisionError(_unavailable(timm_name, filenames[0], folder, source, err)) from err
        return read_state_dict(path), f"imagenet: timm {repo} ({describe_file(path)})"

    return load


def load_into(
    model: nn.Module,
    state: StateDict,
    source: str,
    *,
    classifier: str | None,
    new_parts: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Copy ``state`` into ``model`` and return the ``weights_origin`` entries it accounts for.

    Strict except for four deliberate cases, each reported rather than silent:
    the classifier (keys under the ``classifier`` prefix) is skipped when its shape differs or the
    model has none (``num_classes=0``), so ImageNet or LC25000 weights seed a model with another
    number of classes; keys matching a ``new_parts`` regex (modules the checkpoint's architecture
    lacks, e.g. SE blocks added to a plain DenseNet) may be missing; BatchNorm's
    ``num_batches_tracked`` may be missing (converted checkpoints omit it); an auxiliary mask head
    (``models.masking``, training only) is a new part of a model that has one and is left out of a
    checkpoint by a model that has none. Anything else that does not fit is the user's wrong file
    and raises.
    """
    own = model.state_dict()
    new_parts = dict(new_parts or {})
    if any(re.search(MASK_HEAD_KEYS, k) for k in own):
        new_parts.setdefault("seg_head", MASK_HEAD_KEYS)
    else:
        state = {k: v for k, v in state.items() if not re.search(MASK_HEAD_KEYS, k)}

    def in_classifier(key: str) -> bool:
        return classifier is not None and (key == classifier or key.startswith(classifier + "."))

    ckpt_classifier = {k: v for k, v in state.items() if in_classifier(k)}
    classifier_fits = bool(ckpt_classifier) and all(
        k in own and own[k].shape == v.shape for k, v in ckpt_classifier.items()
    )
    usable = {k: v for k, v in state.items() if classifier_fits or not in_classifier(k)}
    unexpected = sorted(set(usable) - set(own))
    wrong_shape = sorted(k for k in set(usable) & set(own) if usable[k].shape != own[k].shape)
    missing = sorted(
        k
        for k in set(own) - set(usable)
        if not k.endswith("num_batches_tracked")
        and not in_classifier(k)
        and not any(re.search(pattern, k) for pattern in new_parts.values())
    )
    problems = _mismatch_summary(unexpected, wrong_shape, missing)
    if problems:
        raise BreastvisionError(f"weights do not fit {type(model).__name__} ({problems}): {source}")
    model.load_state_dict(usable, strict=False)

    origin = {"backbone": source}
    if classifier is not None and any(in_classifier(k) for k in own):
        origin["classifier"] = source if classifier_fits else RANDOM_INIT
    for part, pattern in new_parts.items():
        if any(re.search(pattern, k) and k not in usable for k in own):
            origin[part] = RANDOM_INIT
    return origin


def _mismatch_summary(unexpected: list[str], wrong_shape: list[str], missing: list[str]) -> str:
    """``unexpected 2 key(s) (a, b); wrong shape 1 key(s) (c)``: the first few of each, or ``""``."""
    return "; ".join(
        f"{label} {len(keys)} key(s) ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
        for label, keys in (("unexpected", unexpected), ("wrong shape", wrong_shape), ("missing", missing))
        if keys
    )


def describe_mismatch(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    """How ``state`` fails to be exactly a state dict of the shapes ``expected`` has (``""``: it is)."""
    wrong = sorted(
        f"{k} {tuple(state[k].shape)}, expected {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    return _mismatch_summary(sorted(set(state) - set(expected)), wrong, sorted(set(expected) - set(state)))


def apply_pretrained(
    model: nn.Module,
    spec: WeightsSpec,
    imagenet: ImagenetLoader | None,
    *,
    classifier: str | None,
    new_parts: Mapping[str, str] | None = None,
    adapt: Callable[[StateDict, nn.Module], StateDict] | None = None,
    what: str | None = None,
) -> dict[str, str]:
    """Resolve ``spec``, adapt the checkpoint's keys to ``model`` if needed, load it; return the
    origin (with ``seg_head``'s when the model has a mask head)."""
    state, source = resolve(spec, imagenet, what or type(model).__name__)
    if state is None:
        origin = {"backbone": RANDOM_INIT}
    else:
        if adapt is not None:
            state = adapt(state, model)
        origin = load_into(model, state, source, classifier=classifier, new_parts=new_parts)
    if getattr(model, "seg_head", None) is not None:
        origin.setdefault("seg_head", origin["backbone"])
    return origin
