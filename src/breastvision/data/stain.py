"""Stain normalisation of H&E histopathology images: Macenko and Reinhard, batched on torch tensors.

Paper 000 normalises the stain of every BreakHis image before augmentation but does not name the
method; Macenko (stain vectors from the optical-density plane, ISBI 2009) and Reinhard (LAB
statistics transfer, 2001) are the two standard ones, so both are offered, scikit-learn style::

    norm = MacenkoNormalizer().fit(reference_image)     # PIL image, HWC uint8 array or CHW tensor
    out = norm.transform(batch)                         # B×3×H×W uint8/float tensor, CPU or GPU
    bundle.preprocessing.stain = norm.state_dict()      # JSON-able; saved in the model file
    same = make_normalizer(bundle.preprocessing.stain)  # re-created at prediction time

**Batching.** Every step is a batched torch op over a chunk of images — optical densities, masked
covariances, batched ``torch.linalg.eigh`` on 3×3 matrices, per-image percentiles, batched
pseudo-inverse — so Python overhead is paid per chunk, not per image, and the device follows the
input tensor. Per-pixel work is kept to few passes: the tissue mask is a threshold on the pixel
values themselves, the output is one ``baddbmm`` and one ``exp`` (Macenko) or one affine map in
CIE ``f`` space (Reinhard: the LAB statistics are a linear function of its covariance), and
percentiles are exact selections (numpy's ``partition`` on CPU).

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
or NaN; ``transform(..., return_fallback=True)`` also returns which images were. Tissue means
what each method estimates from: for Macenko the pixels it fits its plane to (every channel's
optical density ≥ ``beta``), for Reinhard any non-white pixel (some channel's optical density
≥ ``beta``). The default 2 % leaves Macenko ≥ 1,000 pixels of a 224×224 tile, so that its 1st/99th
angle percentiles rest on ≥ 10 order statistics; bright eosin-rich BreakHis tiles transmit almost
all red light and have few such pixels — on the 714 shared 200X tiles, 1.7 % fall back at 2 %
(5.2 % would at 5 %), and torchstain's output for
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
import inspect
import json
import math
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
#: Pixels per chunk on CPU (a few 224×224 tiles): whole-batch temporaries of tens of MB are
#: page-faulted in afresh by every op; see ``StainNormalizer.transform``.
_CPU_CHUNK_PIXELS = 1 << 17


class StainNormalizer:
    """Common machinery: input conversion, fallbacks, parameters, state, hashing.

    scikit-learn's conventions without depending on it (its import would slow down every
    prediction's start-up): ``__init__`` only stores its keyword arguments, ``get_params`` /
    ``set_params`` expose them, ``fit`` validates them, learns the target stain into attributes
    ending in ``_`` and returns ``self``, and ``transform`` changes nothing on the normaliser.
    Subclasses implement ``_statistics(x) -> (stats, ok)`` (the method's statistics of each image
    of a B×3×N batch in [0, 255] (see ``_pixels``), and whether they are usable) and
    ``_normalize(x, stats) -> B×3×N float``, using the fitted ``<key>_`` attributes.
    """

    method: ClassVar[str] = ""
    #: The statistics of ``_statistics`` that make up the fitted target, each stored as ``<key>_``.
    _target_keys: ClassVar[tuple[str, ...]] = ()
    #: The shape of each target statistic, which a state read from a file must have.
    _target_shapes: ClassVar[tuple[tuple[int, ...], ...]] = ()
    #: Whether a tissue pixel needs optical density ≥ ``beta`` in every channel, or in any.
    _tissue_in_every_channel: ClassVar[bool] = True

    def __init__(self, io: float = 240.0, beta: float = 0.15, min_tissue_fraction: float = 0.02) -> None:
        self.io = io
        self.beta = beta
        self.min_tissue_fraction = min_tissue_fraction

    # -- the public, scikit-learn-style interface -------------------------------------------------

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's keyword arguments as currently set (``deep`` is accepted and unused)."""
        names = inspect.signature(type(self).__init__).parameters
        return {name: getattr(self, name) for name in names if name != "self"}

    def set_params(self, **params: Any) -> StainNormalizer:
        valid = self.get_params()
        for name, value in params.items():
            if name not in valid:
                raise BreastvisionError(f"{type(self).__name__} has no parameter '{name}'")
            setattr(self, name, value)
        return self

    def fit(self, X: ImageLike, y: None = None, name: str | None = None) -> StainNormalizer:  # noqa: N803
        """Learn the target stain from one reference image; ``name`` is recorded as ``reference_``."""
        self._validate_params()
        x, _ = _as_batch(X)
        if x.shape[0] != 1:
            raise BreastvisionError(f"fit takes one reference image, got a batch of {x.shape[0]}")
        stats, ok = self._statistics(_pixels(x))
        if not bool(ok[0]):
            raise BreastvisionError(
                f"the stain reference image{f' {name}' if name else ''} has too little tissue or a "
                "degenerate stain distribution; choose an image well covered by stained tissue"
            )
        self._set_target({k: stats[k][0] for k in self._target_keys})
        self.reference_ = name
        return self

    def transform(self, X: ImageLike, return_fallback: bool = False) -> Any:  # noqa: N803
        """Normalise one image or a batch; the output has the input's type, dtype, layout and device.

        Tensors may be CHW or B×3×H×W, uint8 or float in [0, 255]; a PIL image gives a PIL image
        and an HWC uint8 array an HWC uint8 array. With ``return_fallback`` also returns a bool
        tensor (one per image) that is true where the image was returned unnormalised.
        """
        self._require_fitted()
        x, restore = _as_batch(X)
        # On CPU, chunks of bounded size: whole-batch temporaries of tens of MB are page-faulted in
        # afresh by every op and ran at half the speed; CUDA's caching allocator has no such cost.
        step = len(x) if x.device.type != "cpu" else max(1, _CPU_CHUNK_PIXELS // x[0, 0].numel())
        chunks = [self._transform_chunk(chunk) for chunk in x.split(step)]
        fallback = ~torch.cat([ok for _, ok in chunks])
        result = restore(torch.cat([out for out, _ in chunks]) if len(chunks) > 1 else chunks[0][0])
        return (result, fallback) if return_fallback else result

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state that ``from_state`` turns back into an identical normaliser."""
        self._require_fitted()
        return {
            "method": self.method,
            "version": STATE_VERSION,
            "params": {k: float(v) for k, v in self.get_params().items()},
            "target": {k: getattr(self, f"{k}_").tolist() for k in self._target_keys},
            "reference": self.reference_,
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
            target = {k: torch.tensor(state["target"][k], dtype=torch.float32) for k in cls._target_keys}
            norm._validate_params()
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise BreastvisionError(f"malformed {cls.method} stain normaliser state: {err!r}") from None
        for key, shape in zip(cls._target_keys, cls._target_shapes, strict=True):
            value = target[key]
            if tuple(value.shape) != shape or not torch.isfinite(value).all():
                got = f"shape {tuple(value.shape)}" if tuple(value.shape) != shape else "NaN or infinity"
                raise BreastvisionError(
                    f"malformed {cls.method} stain normaliser state: target {key} must be {shape} "
                    f"finite numbers, got {got}"
                )
        norm._set_target(target)
        norm.reference_ = state.get("reference")
        return norm

    @property
    def state_hash(self) -> str:
        """Hash of everything that changes the output (not the reference's name): cache keys use it."""
        state = self.state_dict()
        state.pop("reference")
        return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()

    def __sklearn_is_fitted__(self) -> bool:
        return all(hasattr(self, f"{k}_") for k in self._target_keys)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        fitted = f", fitted on {self.reference_ or 'an image'}" if self.__sklearn_is_fitted__() else ""
        return f"{type(self).__name__}({params}){fitted}"

    def _transform_chunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised chunk (uint8 for uint8 input, else float32) and which images are usable."""
        pixels = _pixels(x)
        stats, ok = self._statistics(pixels)
        out = self._normalize(pixels, stats).clamp_(0, 255)
        # Only finite, usable results replace the input: the contract is "never NaN, never crash".
        # A sum is finite exactly when every (bounded) term is: one reduction, no full-size mask.
        ok = ok & torch.isfinite(out.sum(dim=(1, 2)))
        if not bool(ok.all()):
            out[~ok] = pixels[~ok].to(out.dtype)
        out = out.view(x.shape)
        return (out.round_().to(torch.uint8) if x.dtype == torch.uint8 else out), ok

    # -- for subclasses ----------------------------------------------------------------------------

    def _validate_params(self) -> None:
        io, beta, fraction = self.io, self.beta, self.min_tissue_fraction
        if not 0 < beta or not 0 < io <= 255 or not 0 <= fraction < 1:
            raise BreastvisionError(
                f"stain normaliser parameters out of range: io={io} (0, 255], beta={beta} > 0, "
                f"min_tissue_fraction={fraction} [0, 1)"
            )

    def _set_target(self, target: Stats) -> None:
        for key, value in target.items():
            setattr(self, f"{key}_", value.detach().to("cpu", torch.float32).clone())

    def _target(self, device: torch.device) -> Stats:
        return {k: getattr(self, f"{k}_").to(device) for k in self._target_keys}

    def _require_fitted(self) -> None:
        if not self.__sklearn_is_fitted__():
            raise BreastvisionError(f"the {self.method} stain normaliser is not fitted: call fit(reference)")

    def _tissue(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tissue mask B×N, enough tissue B)`` of a B×3×N batch (see ``_pixels``).

        Optical density ``-log((x + 1) / io) ≥ beta`` is ``x ≤ io·exp(-beta) − 1``: a threshold on
        the pixels, so the mask needs no logarithm and one channel reduction.
        """
        threshold = self.io * math.exp(-self.beta) - 1
        channels = x.amax(dim=1) if self._tissue_in_every_channel else x.amin(dim=1)
        tissue = channels <= threshold
        count = tissue.sum(dim=1)
        enough = (count >= _MIN_TISSUE_PIXELS) & (count >= self.min_tissue_fraction * tissue.shape[1])
        return tissue, enough

    def _statistics(self, x: torch.Tensor) -> tuple[Stats, torch.Tensor]:
        raise NotImplementedError

    def _normalize(self, x: torch.Tensor, stats: Stats) -> torch.Tensor:
        raise NotImplementedError


class MacenkoNormalizer(StainNormalizer):
    """Macenko et al. 2009: stain vectors from the extreme angles in the optical-density plane.

    ``alpha`` is the percentile of the angle distribution taken as each stain's direction (robust
    extremes); ``io`` the transmitted light intensity; ``beta`` the optical density below which a
    pixel counts as background. Defaults are those of the original implementation and torchstain.
    Fitted: ``stain_matrix_`` (3×2, haematoxylin first) and ``max_concentrations_`` (2).
    """

    method = "macenko"
    _target_keys = ("stain_matrix", "max_concentrations")
    _target_shapes = ((3, 2), (2,))

    def __init__(
        self, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15, min_tissue_fraction: float = 0.02
    ) -> None:
        super().__init__(io=io, beta=beta, min_tissue_fraction=min_tissue_fraction)
        self.alpha = alpha

    def _validate_params(self) -> None:
        super()._validate_params()
        if not 0 <= self.alpha < 50:
            raise BreastvisionError(f"Macenko alpha must be a percentile in [0, 50), got {self.alpha}")

    def _statistics(self, x: torch.Tensor) -> tuple[Stats, torch.Tensor]:
        # Optical density is od = log(io) − log1p(x); only log1p(x) is materialised, and the
        # constant enters the two projections below as a bias (``_project_od``).
        log_x = torch.log1p(x)
        tissue, ok = self._tissue(x)
        count = tissue.sum(dim=1).clamp(min=2)[:, None, None]
        w = tissue.unsqueeze(1).to(log_x.dtype)
        centred = log_x.sub((log_x * w).sum(dim=2, keepdim=True) / count).mul_(w)
        cov = centred @ centred.mT / (count - 1)  # the covariance of od: a sign and shift away
        # Images without tissue get an identity covariance so eigh sees no NaN; they fall back anyway.
        eye = torch.eye(3, dtype=cov.dtype, device=cov.device).expand_as(cov)
        cov = torch.where(ok[:, None, None] & torch.isfinite(cov), cov, eye)
        plane = _oriented_plane(torch.linalg.eigh(cov)[1])

        proj = self._project_od(plane.mT, log_x)
        phi = torch.atan2(proj[:, 1], proj[:, 0])
        phi_min, phi_max = _percentiles(phi, (self.alpha, 100 - self.alpha), tissue).unbind(-1)
        v_min = plane @ torch.stack([torch.cos(phi_min), torch.sin(phi_min)], dim=1).unsqueeze(2)
        v_max = plane @ torch.stack([torch.cos(phi_max), torch.sin(phi_max)], dim=1).unsqueeze(2)
        # Haematoxylin first: it absorbs red more than eosin does (the original heuristic).
        h_first = (v_min[:, 0] > v_max[:, 0]).unsqueeze(1)
        stains = torch.where(h_first, torch.cat([v_min, v_max], 2), torch.cat([v_max, v_min], 2))

        conc = self._project_od(torch.linalg.pinv(stains), log_x)
        max_conc = _percentiles(conc, (99,))[..., 0]
        cosine = (stains[:, :, 0] * stains[:, :, 1]).sum(1) / (stains.norm(dim=1).prod(dim=1).clamp(min=_EPS))
        ok = (
            ok
            & (cosine.abs() < _MAX_STAIN_COSINE)
            & (max_conc > _EPS).all(dim=1)
            & torch.isfinite(stains).flatten(1).all(dim=1)
        )
        return {"stain_matrix": stains, "max_concentrations": max_conc, "concentrations": conc}, ok

    def _project_od(self, matrix: torch.Tensor, log_x: torch.Tensor) -> torch.Tensor:
        """``matrix @ od`` (B×k×N) for od = log(io) − log_x, in one pass over the pixels."""
        bias = matrix.sum(dim=2, keepdim=True) * math.log(self.io)
        return torch.baddbmm(bias, matrix, log_x, alpha=-1)

    def _normalize(self, x: torch.Tensor, stats: Stats) -> torch.Tensor:
        target = self._target(x.device)
        scale = target["max_concentrations"] / stats["max_concentrations"].clamp(min=_EPS)
        # io·exp(−S_target · (scale ⊙ C)) with the scale folded into the stain matrix: one pass.
        mixing = target["stain_matrix"] * scale.unsqueeze(1)
        log_io = torch.tensor(math.log(self.io), dtype=mixing.dtype, device=x.device)
        return torch.baddbmm(log_io, mixing, stats["concentrations"], alpha=-1).exp_()


def _oriented_plane(eigvecs: torch.Tensor) -> torch.Tensor:
    """The two principal eigenvectors (B×3×2, ascending eigenvalues) with a reproducible sign.

    eigh's sign is arbitrary: the principal axis is pointed into positive OD (else the angles wrap
    round ±π) and the second axis by its largest component, so CPU and GPU pick the same sign.
    """
    plane = eigvecs[:, :, 1:3]
    second = plane[:, :, 0]
    signs = torch.stack(
        [second.gather(1, second.abs().argmax(1, keepdim=True)).squeeze(1), plane[:, :, 1].sum(dim=1)], 1
    )
    return plane * torch.where(signs < 0, -1.0, 1.0).unsqueeze(1)


class ReinhardNormalizer(StainNormalizer):
    """Reinhard et al. 2001: match each LAB channel's mean and standard deviation to the reference.

    Statistics are over all pixels with the unbiased standard deviation, as torchstain and
    StainTools compute them, so results are comparable; the tissue check only decides fallbacks.
    Fitted: ``lab_means_`` and ``lab_stds_`` (3 each, L*, a*, b*).
    """

    method = "reinhard"
    _target_keys = ("lab_means", "lab_stds")
    _target_shapes = ((3,), (3,))
    _tissue_in_every_channel = False

    def _statistics(self, x: torch.Tensor) -> tuple[Stats, torch.Tensor]:
        _, ok = self._tissue(x)
        # L*a*b* = P·f + q is linear in CIE f, so its means and spreads follow from f's mean and
        # covariance; f is kept centred for ``_normalize``.
        f = _cie_f(x, peak=255.0)
        mean = f.mean(dim=2, keepdim=True)
        centred = f.sub_(mean)
        cov = centred @ centred.mT / (x.shape[2] - 1)
        lab_f = _LAB_FROM_F.to(x.device)
        means = (lab_f @ mean).squeeze(2) + _LAB_OFFSET.to(x.device)
        stds = torch.einsum("ij,bjk,ik->bi", lab_f, cov, lab_f).clamp(min=0).sqrt()
        ok = ok & (stds > 1e-3).all(dim=1) & torch.isfinite(stds).all(dim=1)
        return {"lab_means": means, "lab_stds": stds, "centred_f": centred}, ok

    def _normalize(self, x: torch.Tensor, stats: Stats) -> torch.Tensor:
        # lab' = D·(lab − mean) + target mean with D = diag(target std / std) is, in f space,
        # f' = P⁻¹·D·P·(f − mean f) + P⁻¹·(target mean − q): one batched affine map.
        target = self._target(x.device)
        lab_f = _LAB_FROM_F.to(x.device)
        f_lab = torch.linalg.inv(lab_f)
        gain = target["lab_stds"] / stats["lab_stds"].clamp(min=_EPS)
        affine = f_lab @ (gain.unsqueeze(2) * lab_f)
        shift = (f_lab @ (target["lab_means"] - _LAB_OFFSET.to(x.device))).view(1, 3, 1)
        return _rgb_from_f(torch.baddbmm(shift, affine, stats["centred_f"]), peak=255.0)


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
    probe._validate_params()  # fit() validates; the candidates are fitted without it
    usable: list[Path] = []
    features: list[torch.Tensor] = []
    for path in candidates:
        x, _ = _as_batch(load_image(path))
        stats, ok = probe._statistics(_pixels(x))
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


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """B×3×H×W → B×3×N, uint8 kept (torch ops promote it to float32 where needed, which saves a
    float copy) and anything else as float32; a view where possible, so never modified in place."""
    return x.flatten(2) if x.dtype == torch.uint8 else x.flatten(2).to(torch.float32)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp(0, 255).to(torch.uint8) if x.dtype != torch.uint8 else x


def _percentiles(values: torch.Tensor, qs: Sequence[float], mask: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest-rank ``qs``-th percentiles along the last dim (a new last dim of ``len(qs)``), over
    the masked entries if a mask is given; rows with nothing masked give 0.

    The rank is torchstain's (``round(q / 100 · (n − 1))``, 0-based). On CPU each row is compacted
    to its masked entries once and read off by numpy's ``partition`` (a vectorised selection, many
    times faster than ``topk`` or a mask-filled tensor); elsewhere ``topk`` from the nearer end.
    """
    shape = values.shape[:-1]
    rows = values.reshape(-1, values.shape[-1])
    masks = None if mask is None else mask.reshape(rows.shape)
    if rows.device.type != "cpu":
        found = torch.stack([_select_topk(rows, q, masks) for q in qs], dim=-1)
        return found.view(*shape, len(qs))
    keep = None if masks is None else masks.numpy()
    found_rows = []
    for i, row in enumerate(rows.numpy()):
        row = row if keep is None else row[keep[i]]
        ranks = [round(0.01 * q * (len(row) - 1)) for q in qs]
        found_rows.append([float(np.partition(row, r)[r]) if len(row) else 0.0 for r in ranks])
    return torch.tensor(found_rows, dtype=values.dtype).view(*shape, len(qs))


def _select_topk(rows: torch.Tensor, q: float, mask: torch.Tensor | None) -> torch.Tensor:
    """``_percentiles`` of one ``q`` by one partial sort per row (``topk`` from the nearer end)."""
    count = mask.sum(-1) if mask is not None else torch.full_like(rows[:, 0], rows.shape[1]).long()
    last = (count - 1).clamp(min=0)
    rank = torch.round(0.01 * q * last.to(torch.float64)).long()
    largest = q > 50
    k = last - rank if largest else rank  # 0-based position counted from the nearer end
    if mask is not None:
        rows = rows.masked_fill(~mask, float("-inf") if largest else float("inf"))
    nearest = rows.topk(int(k.max()) + 1, dim=-1, largest=largest).values
    return torch.where(count > 0, nearest.gather(-1, k.unsqueeze(-1)).squeeze(-1), 0.0)


# -- CIE LAB (sRGB, D65), the conversion Reinhard needs, batched over B×3×N --------------------------

_RGB_TO_XYZ = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_WHITE = torch.tensor([0.95047, 1.0, 1.08883])
_XYZ_FROM_RGB = _RGB_TO_XYZ / _WHITE[:, None]  # XYZ relative to the white point
_RGB_FROM_XYZ = torch.linalg.inv(_XYZ_FROM_RGB)
#: L*a*b* = _LAB_FROM_F · (f(X/Xn), f(Y/Yn), f(Z/Zn)) + _LAB_OFFSET.
_LAB_FROM_F = torch.tensor([[0.0, 116.0, 0.0], [500.0, -500.0, 0.0], [0.0, 200.0, -200.0]])
_LAB_OFFSET = torch.tensor([-16.0, 0.0, 0.0])


# The sRGB and CIE curves are a power law joined continuously to a line below a knee, so each is
# ``power(max(v, knee)) + slope · min(v − knee, 0)``: the same values as a ``torch.where`` of the two
# pieces, without a full-size mask or computing both pieces everywhere (``where`` is slow on CPU).


def _srgb_to_linear(rgb: torch.Tensor, peak: float) -> torch.Tensor:
    """Linear RGB in [0, 1] of sRGB values in [0, ``peak``] (uint8 values: in [0, 255])."""
    if rgb.dtype == torch.uint8:  # 256 possible values: a table beats the power law
        return _linear_table(rgb.device).index_select(0, rgb.flatten().int()).view(rgb.shape)
    knee = 0.04045 * peak
    linear = rgb.clamp(min=knee).mul_(1 / (1.055 * peak)).add_(0.055 / 1.055).pow_(2.4)
    return linear.add_(rgb.clamp(max=knee).sub_(knee), alpha=1 / (12.92 * peak))


@lru_cache(maxsize=4)
def _linear_table(device: torch.device) -> torch.Tensor:
    return _srgb_to_linear(torch.arange(256.0, device=device), 255.0)


def _cie_f(rgb: torch.Tensor, peak: float) -> torch.Tensor:
    """CIE f of X/Xn, Y/Yn, Z/Zn (B×3×N) of sRGB pixels in [0, ``peak``] (B×3×N); a new tensor."""
    xyz = _XYZ_FROM_RGB.to(rgb.device) @ _srgb_to_linear(rgb, peak)
    knee = (6 / 29) ** 3
    f = xyz.clamp(min=knee).pow_(1 / 3)
    return f.add_(xyz.clamp_(max=knee).sub_(knee), alpha=1 / (3 * knee ** (2 / 3)))


def _rgb_from_f(f: torch.Tensor, peak: float) -> torch.Tensor:
    """sRGB in [0, ``peak``] (clipped) of CIE f values (B×3×N): the inverse of ``_cie_f``."""
    knee = 6 / 29
    xyz = f.clamp(min=knee).pow_(3).add_(f.clamp(max=knee).sub_(knee), alpha=3 * knee**2)
    linear = (_RGB_FROM_XYZ.to(f) @ xyz).clamp_(min=0)
    knee = 0.0031308
    srgb = linear.clamp(min=knee).pow_(1 / 2.4).mul_(1.055 * peak).sub_(0.055 * peak)
    return srgb.add_(linear.clamp_(max=knee).sub_(knee), alpha=12.92 * peak).clamp_(0, peak)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] → CIE L*a*b* (L in [0, 100]), B×3×H×W, channels in dim 1."""
    f = _cie_f(rgb.flatten(2), peak=1.0)
    return (_LAB_FROM_F.to(f) @ f + _LAB_OFFSET.to(f)[:, None]).view(rgb.shape)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* → sRGB clipped to [0, 1], B×3×H×W (inverse of ``rgb_to_lab``)."""
    f = torch.linalg.inv(_LAB_FROM_F).to(lab) @ (lab.flatten(2) - _LAB_OFFSET.to(lab)[:, None])
    return _rgb_from_f(f, peak=1.0).view(lab.shape)
