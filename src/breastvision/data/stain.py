"""Stain normalisation of H&E histopathology images: Macenko and Reinhard, batched on torch tensors.

Paper 000 normalises the stain of every BreakHis image before augmentation but does not name the
method; Macenko (stain vectors from the optical-density plane, ISBI 2009) and Reinhard (LAB
statistics transfer, 2001) are the two standard ones, so both are offered, scikit-learn style::

    norm = MacenkoNormalizer().fit(reference_image)     # PIL image, HWC uint8 array or CHW tensor
    out = norm.transform(batch)                         # B×3×H×W uint8/float tensor, CPU or GPU
    bundle.preprocessing.stain = norm.state_dict()      # JSON-able; saved in the model file
    same = make_normalizer(bundle.preprocessing.stain)  # re-created at prediction time

**Batching.** Every step is a batched torch op — optical densities, masked covariances, batched
``torch.linalg.eigh`` on B 3×3 matrices, per-image percentiles by one sort, batched pseudo-inverse —
so a batch costs one pass whatever its size, and the device follows the input tensor.

**Agreement with the reference implementation.** The Macenko arithmetic follows torchstain's torch
backend (itself a port of the original Macenko code): transmitted light ``io=240``, transparency
threshold ``beta=0.15`` on every channel's optical density, angle percentiles ``alpha=1`` / 99 by
nearest rank, 99th-percentile maximum concentrations over all pixels. Two deliberate differences:
outputs are *rounded* to uint8 rather than truncated (truncation darkens every pixel by half a grey
level on average), and the principal eigenvector's sign is fixed to point into positive optical
density, since ``eigh`` may return either sign and a flipped vector wraps the angle distribution
round ±π. ``tests/test_stain.py`` checks the outputs agree within a mean absolute difference of
1 grey level on real BreakHis images.

**Tiles without tissue.** A tile whose tissue fraction is below ``min_tissue_fraction``, or whose
fitted statistics are degenerate (stain vectors nearly parallel, non-positive maximum concentration,
zero LAB spread, anything non-finite), is returned unchanged instead of being amplified into noise
or NaN. Such tiles are counted in ``normalizer.fallbacks`` and reported per image by
``transform(..., return_fallback=True)``. Tissue means what each method estimates from: for Macenko
the pixels it fits its plane to (every channel's optical density ≥ ``beta``), for Reinhard any
non-white pixel (some channel's optical density ≥ ``beta``). The default 2 % leaves Macenko ≥ 1,000
pixels of a 224×224 tile, so that its 1st/99th angle percentiles rest on ≥ 10 order statistics;
bright eosin-rich BreakHis tiles transmit almost all red light and have few such pixels — on the
714 shared 200X tiles, 1.7 % fall back at 2 % (5.2 % would at 5 %), and torchstain's output for
tiles below that threshold is visibly washed out.

**Reference image.** A user-given reference is used as is (``fit_normalizer(method, reference=...)``).
Without one, the reference is the most *typical* training image, chosen deterministically:
up to ``max_candidates`` training images evenly spaced in path order are each fitted, and the one
whose fitted statistics (stain matrix and maximum concentrations for Macenko, LAB means and
standard deviations for Reinhard) lie nearest the candidates' median — in units of each statistic's
spread — becomes the reference. A typical image rather than "the first file" because normalising
every slide towards an outlier stain distorts most of the data set; deterministic so that reruns
and other machines pick the same one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from breastvision.data.io import load_image
from breastvision.errors import BreastvisionError

ImageLike = Image.Image | np.ndarray | torch.Tensor
Stats = dict[str, torch.Tensor]

STATE_VERSION = 1
#: Below this many tissue pixels covariances and percentiles are not estimable, whatever the fraction.
_MIN_TISSUE_PIXELS = 16
#: Stain vectors with a larger |cos| are treated as one stain: the 3×2 inverse would blow up noise.
_MAX_STAIN_COSINE = 0.995
_EPS = 1e-6
#: Pixels per chunk on CPU (about 2.6 tiles of 224×224; larger chunks measured no faster): see
#: ``StainNormalizer.transform``.
_CPU_CHUNK_PIXELS = 1 << 17


class StainNormalizer:
    """Common machinery: input conversion, fallback bookkeeping, state, hashing.

    Subclasses implement ``_fit_batch(x) -> (stats, ok)`` (the method's statistics of each image of
    a float B×3×H×W batch in [0, 255], and whether they are usable) and ``_normalize(x, stats, target)``.
    """

    method: ClassVar[str] = ""
    #: The statistics of ``_fit_batch`` that make up the fitted target (the rest are per-image work).
    _target_keys: ClassVar[tuple[str, ...]] = ()
    #: The shape of each target statistic, which a state read from a file must have.
    _target_shapes: ClassVar[tuple[tuple[int, ...], ...]] = ()
    #: Whether a tissue pixel needs optical density ≥ ``beta`` in every channel, or in any.
    _tissue_in_every_channel: ClassVar[bool] = True

    def __init__(self, io: float = 240.0, beta: float = 0.15, min_tissue_fraction: float = 0.02) -> None:
        if not 0 < beta or not 0 < io <= 255 or not 0 <= min_tissue_fraction < 1:
            raise BreastvisionError(
                f"stain normaliser parameters out of range: io={io} (0, 255], beta={beta} > 0, "
                f"min_tissue_fraction={min_tissue_fraction} [0, 1)"
            )
        self.io = float(io)
        self.beta = float(beta)
        self.min_tissue_fraction = float(min_tissue_fraction)
        self.reference: str | None = None
        #: Images returned unnormalised (too little tissue or degenerate statistics), since creation.
        self.fallbacks = 0
        self._target: dict[str, torch.Tensor] | None = None

    # -- the public, scikit-learn-style interface -------------------------------------------------

    def fit(self, reference: ImageLike, name: str | None = None) -> StainNormalizer:
        """Learn the target stain from one reference image; ``name`` is recorded in the state."""
        x, _ = _as_batch(reference)
        if x.shape[0] != 1:
            raise BreastvisionError(f"fit takes one reference image, got a batch of {x.shape[0]}")
        stats, ok = self._fit_batch(_to_float(x))
        if not bool(ok[0]):
            raise BreastvisionError(
                f"the stain reference image{f' {name}' if name else ''} has too little tissue or a "
                "degenerate stain distribution; choose an image well covered by stained tissue"
            )
        self._target = {k: stats[k][0].detach().to("cpu", torch.float32) for k in self._target_keys}
        self.reference = name
        return self

    def transform(self, images: ImageLike, return_fallback: bool = False) -> Any:
        """Normalise one image or a batch; the output has the input's type, dtype, layout and device.

        Tensors may be CHW or B×3×H×W, uint8 or float in [0, 255]; a PIL image gives a PIL image
        and an HWC uint8 array an HWC uint8 array. With ``return_fallback`` also returns a bool
        tensor (one per image) that is true where the image was returned unnormalised.
        """
        target = self._require_fitted()
        x, restore = _as_batch(images)
        target = {k: v.to(x.device) for k, v in target.items()}
        # On CPU, chunks of bounded size: whole-batch temporaries of tens of MB are page-faulted in
        # afresh by every op and ran at half the speed; CUDA's caching allocator has no such cost.
        step = len(x) if x.device.type != "cpu" else max(1, _CPU_CHUNK_PIXELS // x[0, 0].numel())
        chunks = [self._transform_chunk(chunk, target) for chunk in x.split(step)]
        fallback = ~torch.cat([ok for _, ok in chunks])
        self.fallbacks += int(fallback.sum())
        result = restore(torch.cat([out for out, _ in chunks]))
        return (result, fallback) if return_fallback else result

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state that ``from_state`` turns back into an identical normaliser."""
        target = self._require_fitted()
        return {
            "method": self.method,
            "version": STATE_VERSION,
            "params": self._params(),
            "target": {k: v.tolist() for k, v in target.items()},
            "reference": self.reference,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> StainNormalizer:
        """The normaliser a ``state_dict()`` came from (for any method: see ``make_normalizer``)."""
        if state.get("method") != cls.method:
            return make_normalizer(state)
        if state.get("version") != STATE_VERSION:
            raise BreastvisionError(
                f"stain normaliser state version {state.get('version')} is not supported "
                f"(this breastvision reads version {STATE_VERSION})"
            )
        try:
            norm = cls(**state["params"])
            target = state["target"]
            norm._target = {k: torch.tensor(target[k], dtype=torch.float32) for k in cls._target_keys}
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise BreastvisionError(f"malformed {cls.method} stain normaliser state: {err!r}") from None
        for key, shape in zip(cls._target_keys, cls._target_shapes, strict=True):
            value = norm._target[key]
            if tuple(value.shape) != shape or not torch.isfinite(value).all():
                got = f"shape {tuple(value.shape)}" if tuple(value.shape) != shape else "NaN or infinity"
                raise BreastvisionError(
                    f"malformed {cls.method} stain normaliser state: target {key} must be {shape} "
                    f"finite numbers, got {got}"
                )
        norm.reference = state.get("reference")
        return norm

    @property
    def state_hash(self) -> str:
        """Hash of everything that changes the output (not the reference's name): cache keys use it."""
        state = self.state_dict()
        state.pop("reference")
        return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()

    @property
    def is_fitted(self) -> bool:
        return self._target is not None

    def __repr__(self) -> str:
        fitted = f"fitted on {self.reference or 'an image'}" if self.is_fitted else "not fitted"
        return f"{type(self).__name__}({self._params()}, {fitted})"

    def _transform_chunk(self, x: torch.Tensor, target: Stats) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised chunk (uint8 for uint8 input, else float32) and which images are usable."""
        xf = _to_float(x)
        stats, ok = self._fit_batch(xf)
        out = self._normalize(xf, stats, target)
        # Only finite, usable results replace the input: the contract is "never NaN, never crash".
        # A sum is finite exactly when every (bounded) term is: one reduction, no full-size mask.
        ok = ok & torch.isfinite(out.flatten(1).sum(dim=1))
        out = torch.where(ok[:, None, None, None], out.clamp(0, 255), xf)
        return (_to_uint8(out) if x.dtype == torch.uint8 else out), ok

    # -- for subclasses ----------------------------------------------------------------------------

    def _params(self) -> dict[str, float]:
        return {"io": self.io, "beta": self.beta, "min_tissue_fraction": self.min_tissue_fraction}

    def _require_fitted(self) -> dict[str, torch.Tensor]:
        if self._target is None:
            raise BreastvisionError(f"the {self.method} stain normaliser is not fitted: call fit(reference)")
        return self._target

    def _optical_density(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(od B×3×N, tissue mask B×N, enough tissue B)`` of a float batch in [0, 255]."""
        od = -torch.log((x.flatten(2) + 1) / self.io)
        dense = od >= self.beta
        tissue = dense.all(dim=1) if self._tissue_in_every_channel else dense.any(dim=1)
        count = tissue.sum(dim=1)
        enough = (count >= _MIN_TISSUE_PIXELS) & (count >= self.min_tissue_fraction * tissue.shape[1])
        return od, tissue, enough

    def _fit_batch(self, x: torch.Tensor) -> tuple[Stats, torch.Tensor]:
        raise NotImplementedError

    def _normalize(self, x: torch.Tensor, stats: Stats, target: Stats) -> torch.Tensor:
        raise NotImplementedError


class MacenkoNormalizer(StainNormalizer):
    """Macenko et al. 2009: stain vectors from the extreme angles in the optical-density plane.

    ``alpha`` is the percentile of the angle distribution taken as each stain's direction (robust
    extremes); ``io`` the transmitted light intensity; ``beta`` the optical density below which a
    pixel counts as background. Defaults are those of the original implementation and torchstain.
    """

    method = "macenko"
    _target_keys = ("stain_matrix", "max_concentrations")
    _target_shapes = ((3, 2), (2,))

    def __init__(
        self, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15, min_tissue_fraction: float = 0.02
    ) -> None:
        super().__init__(io=io, beta=beta, min_tissue_fraction=min_tissue_fraction)
        if not 0 <= alpha < 50:
            raise BreastvisionError(f"Macenko alpha must be a percentile in [0, 50), got {alpha}")
        self.alpha = float(alpha)

    def _params(self) -> dict[str, float]:
        return {**super()._params(), "alpha": self.alpha}

    def _fit_batch(self, x: torch.Tensor) -> tuple[Stats, torch.Tensor]:
        od, tissue, ok = self._optical_density(x)
        count = tissue.sum(dim=1, keepdim=True).clamp(min=2)
        w = tissue.unsqueeze(1).to(od.dtype)
        centred = (od - (od * w).sum(dim=2, keepdim=True) / count.unsqueeze(1)) * w
        cov = centred @ centred.transpose(1, 2) / (count.unsqueeze(2) - 1)
        # Images without tissue get an identity covariance so eigh sees no NaN; they fall back anyway.
        eye = torch.eye(3, dtype=od.dtype, device=od.device).expand_as(cov)
        cov = torch.where(ok[:, None, None] & torch.isfinite(cov), cov, eye)
        _, eigvecs = torch.linalg.eigh(cov)
        plane = eigvecs[:, :, 1:3]
        # eigh's sign is arbitrary: point the principal axis into positive OD (else the angles wrap
        # round ±π) and the second axis by its largest component, so CPU and GPU pick the same sign.
        second = plane[:, :, 0]
        signs = torch.stack(
            [second.gather(1, second.abs().argmax(1, keepdim=True)).squeeze(1), plane[:, :, 1].sum(dim=1)], 1
        )
        plane = plane * torch.where(signs < 0, -1.0, 1.0).unsqueeze(1)

        proj = plane.transpose(1, 2) @ od
        phi = torch.atan2(proj[:, 1], proj[:, 0])
        phi_min = _percentile(phi, self.alpha, tissue)
        phi_max = _percentile(phi, 100 - self.alpha, tissue)
        v_min = plane @ torch.stack([torch.cos(phi_min), torch.sin(phi_min)], dim=1).unsqueeze(2)
        v_max = plane @ torch.stack([torch.cos(phi_max), torch.sin(phi_max)], dim=1).unsqueeze(2)
        # Haematoxylin first: it absorbs red more than eosin does (the original heuristic).
        h_first = (v_min[:, 0] > v_max[:, 0]).unsqueeze(1)
        stains = torch.where(h_first, torch.cat([v_min, v_max], 2), torch.cat([v_max, v_min], 2))

        conc = torch.linalg.pinv(stains) @ od
        max_conc = _percentile(conc, 99)
        cosine = (stains[:, :, 0] * stains[:, :, 1]).sum(1) / (stains.norm(dim=1).prod(dim=1).clamp(min=_EPS))
        ok = (
            ok
            & (cosine.abs() < _MAX_STAIN_COSINE)
            & (max_conc > _EPS).all(dim=1)
            & torch.isfinite(stains).flatten(1).all(dim=1)
        )
        return {"stain_matrix": stains, "max_concentrations": max_conc, "concentrations": conc}, ok

    def _normalize(self, x: torch.Tensor, stats: Stats, target: Stats) -> torch.Tensor:
        scale = target["max_concentrations"] / stats["max_concentrations"].clamp(min=_EPS)
        conc = stats["concentrations"] * scale.unsqueeze(2)
        out = self.io * torch.exp(-target["stain_matrix"] @ conc)
        return out.reshape(x.shape)


class ReinhardNormalizer(StainNormalizer):
    """Reinhard et al. 2001: match each LAB channel's mean and standard deviation to the reference.

    Statistics are over all pixels with the unbiased standard deviation, as torchstain and
    StainTools compute them, so results are comparable; the tissue check only decides fallbacks.
    """

    method = "reinhard"
    _target_keys = ("lab_means", "lab_stds")
    _target_shapes = ((3,), (3,))
    _tissue_in_every_channel = False

    def _fit_batch(self, x: torch.Tensor) -> tuple[Stats, torch.Tensor]:
        _, _, ok = self._optical_density(x)
        lab = rgb_to_lab(x / 255).flatten(2)
        means, stds = lab.mean(dim=2), lab.std(dim=2)
        ok = ok & (stds > 1e-3).all(dim=1) & torch.isfinite(stds).all(dim=1)
        return {"lab_means": means, "lab_stds": stds, "lab": lab}, ok

    def _normalize(self, x: torch.Tensor, stats: Stats, target: Stats) -> torch.Tensor:
        gain = target["lab_stds"][None] / stats["lab_stds"].clamp(min=_EPS)
        lab = (stats["lab"] - stats["lab_means"].unsqueeze(2)) * gain.unsqueeze(2)
        lab = lab + target["lab_means"][:, None]
        return lab_to_rgb(lab.reshape(x.shape)) * 255


_METHODS: dict[str, type[StainNormalizer]] = {
    MacenkoNormalizer.method: MacenkoNormalizer,
    ReinhardNormalizer.method: ReinhardNormalizer,
}
METHODS = tuple(_METHODS)


def make_normalizer(state_or_method: dict[str, Any] | str, **params: float) -> StainNormalizer:
    """A fitted normaliser from a ``state_dict()``, or an unfitted one from a method name."""
    if isinstance(state_or_method, str):
        cls = _method_class(state_or_method)
        try:
            return cls(**params)
        except TypeError as err:
            raise BreastvisionError(f"bad {state_or_method} stain normaliser parameters: {err}") from err
    if not isinstance(state_or_method, dict) or "method" not in state_or_method:
        raise BreastvisionError("a stain normaliser state must be a dict with a 'method' key")
    return _method_class(state_or_method["method"]).from_state(state_or_method)


@lru_cache(maxsize=8)
def _normalizer_from_json(state_json: str) -> StainNormalizer:
    return make_normalizer(json.loads(state_json))


def cached_normalizer(state: dict[str, Any]) -> StainNormalizer:
    """``make_normalizer(state)``, built once per distinct state: per-image prediction calls this."""
    return _normalizer_from_json(json.dumps(state, sort_keys=True))


def _method_class(method: str) -> type[StainNormalizer]:
    try:
        return _METHODS[method.lower()]
    except KeyError:
        raise BreastvisionError(
            f"unknown stain normalisation method '{method}' (choose from {', '.join(METHODS)})"
        ) from None


def choose_reference(
    paths: Sequence[str | Path], method: str = "macenko", max_candidates: int = 32, **params: float
) -> Path:
    """The most typical of (an evenly spaced sample of) ``paths``: see the module docstring."""
    ordered = sorted(Path(p) for p in paths)
    if not ordered:
        raise BreastvisionError("no images to choose a stain reference from")
    step = max(1, len(ordered) // max_candidates)
    candidates = ordered[::step][:max_candidates]
    probe = make_normalizer(method, **params)
    usable: list[Path] = []
    features: list[torch.Tensor] = []
    for path in candidates:
        x, _ = _as_batch(load_image(path))
        stats, ok = probe._fit_batch(_to_float(x))
        if bool(ok[0]):
            usable.append(path)
            features.append(torch.cat([stats[k][0].flatten() for k in probe._target_keys]))
    if not usable:
        raise BreastvisionError(
            f"none of the {len(candidates)} candidate images has enough tissue to be a stain reference"
        )
    feats = torch.stack(features).double()
    median = feats.median(dim=0).values
    spread = (feats - median).abs().median(dim=0).values.clamp(min=1e-6)
    distance = ((feats - median) / spread).square().sum(dim=1)
    return usable[int(distance.argmin())]


def fit_normalizer(
    method: str,
    reference: str | Path | ImageLike | None = None,
    candidates: Sequence[str | Path] | None = None,
    **params: float,
) -> StainNormalizer:
    """A normaliser fitted on ``reference`` (a path or image), else on the most typical candidate."""
    norm = make_normalizer(method, **params)
    if reference is None:
        if not candidates:
            raise BreastvisionError("stain normalisation needs a reference image or training images")
        reference = choose_reference(candidates, method, **params)
        note = f" (most typical of {len(candidates)} training images)"
    else:
        note = ""
    if isinstance(reference, str | Path):
        return norm.fit(load_image(reference), name=f"{Path(reference).name}{note}")
    return norm.fit(reference, name="user-given image")


# -- tensors in and out ----------------------------------------------------------------------------


def _as_batch(images: ImageLike) -> tuple[torch.Tensor, Any]:
    """A B×3×H×W tensor of the input, and a function turning a float result back into its kind."""
    if isinstance(images, Image.Image):
        arr = np.asarray(images.convert("RGB"))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None], lambda t: Image.fromarray(
            _to_uint8(t)[0].permute(1, 2, 0).cpu().numpy()
        )
    if isinstance(images, np.ndarray):
        if images.ndim != 3 or images.shape[2] != 3:
            raise BreastvisionError(f"expected an H×W×3 image array, got shape {images.shape}")
        dtype = images.dtype
        return (
            torch.from_numpy(np.ascontiguousarray(images)).permute(2, 0, 1)[None],
            lambda t: (
                (_to_uint8(t) if dtype == np.uint8 else t)[0].permute(1, 2, 0).cpu().numpy().astype(dtype)
            ),
        )
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            x, restore = _as_batch(images[None])
            return x, lambda t: restore(t)[0]
        if images.ndim != 4 or images.shape[1] != 3:
            raise BreastvisionError(f"expected a 3×H×W or B×3×H×W tensor, got shape {tuple(images.shape)}")
        dtype = images.dtype
        return images, lambda t: t.to(dtype) if dtype.is_floating_point else _to_uint8(t).to(dtype)
    raise BreastvisionError(f"cannot stain-normalise a {type(images).__name__}; give a PIL image or a tensor")


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp(0, 255).to(torch.uint8) if x.dtype != torch.uint8 else x


def _percentile(values: torch.Tensor, q: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest-rank ``q``-th percentile along the last dim, over the masked entries if a mask is given.

    The rank is torchstain's (``round(q / 100 · (n − 1))``, 0-based); it is read off a partial sort
    (``topk`` from the nearer end), several times faster than a full sort or ``kthvalue`` on CPU.
    Rows with nothing masked give 0.
    """
    count = torch.as_tensor(values.shape[-1] if mask is None else mask.sum(-1), device=values.device)
    last = (count - 1).clamp(min=0)
    rank = torch.round(0.01 * q * last.to(torch.float64)).long()
    largest = q > 50
    index = (last - rank if largest else rank).expand(values.shape[:-1])
    if mask is not None:
        values = torch.where(mask, values, float("-inf") if largest else float("inf"))
    nearest = values.topk(int(index.max()) + 1, dim=-1, largest=largest).values
    return nearest.gather(-1, index.unsqueeze(-1)).squeeze(-1).nan_to_num(0.0, posinf=0.0, neginf=0.0)


# -- CIE LAB (sRGB, D65), the conversion Reinhard needs, batched over B×3×H×W in [0, 1] ------------

_RGB_TO_XYZ = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_WHITE = torch.tensor([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] → CIE L*a*b* (L in [0, 100]), channels in dim 1."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    matrix = (_RGB_TO_XYZ / _WHITE[:, None]).to(rgb)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* → sRGB clipped to [0, 1], channels in dim 1 (inverse of ``rgb_to_lab``)."""
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], dim=1)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16 / 116) / 7.787)
    matrix = torch.linalg.inv(_RGB_TO_XYZ / _WHITE[:, None]).to(lab)
    linear = torch.einsum("ij,bjhw->bihw", matrix, xyz).clamp(min=0)
    return torch.where(linear > 0.0031308, 1.055 * linear ** (1 / 2.4) - 0.055, 12.92 * linear).clamp(0, 1)
