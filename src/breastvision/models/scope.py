"""A model's scope: what its inputs looked like in training, so that an input far outside is flagged
("outside this model's scope") rather than given a confident label.

Method: the multi-layer Mahalanobis detector of Lee et al. (NeurIPS 2018). At each of several layers
the outputs are pooled globally (the mean over space, or over a ViT's tokens) and modelled as
class-conditional Gaussians with one shared covariance; a layer's distance is the smallest
Mahalanobis distance to a class mean, and an input's score is the sum of its layers' distances, each
standardised by the mean and standard deviation of the validation images' distances at that layer.

- **Why several layers** (``default_layers``): the penultimate features (the head's input,
  ``PRE_LOGITS``) are trained to separate the classes, so they keep what tells benign from
  malignant and drop much of what tells breast histology from lung or colon histology, which share
  stain and structures. Earlier blocks keep colour and texture statistics that differ between such
  near domains; the penultimate layer still catches inputs that look right but sit between the
  classes. DenseNets give the outputs of dense blocks 1–3, ResNets layers 1–3, ViTs the blocks at a
  quarter, half and three quarters of the depth (a fusion model both branches'); other
  architectures the penultimate features alone.
- **Why the standardised sum**: layers differ in dimension and so in the size of their distances;
  standardising puts them on one scale without any off-domain data to weigh them with (Lee et al.
  fit the weights on off-domain samples, which a model's training does not have), and a sum lets
  several moderately surprised layers add up where a maximum would ignore all but one.
- **Why Mahalanobis** rather than an energy score (logsumexp of the logits): the energy sees only the
  K logits, and a classifier trained on two or three classes maps most off-domain images to some
  confident logit vector.
- **Why a shared covariance with Ledoit-Wolf shrinkage** (``sklearn.covariance.LedoitWolf``): one
  covariance estimate instead of one per class, and with fewer images than dimensions the sample
  covariance is singular; the shrinkage is chosen analytically, with no parameter to tune.
- **Threshold**: the means and covariances are fitted on the training images, whose own distances are
  optimistically small, so the standardisation and the threshold come from the validation images,
  which the statistics never saw and which, like test images, come from other patients. The
  threshold is the ``QUANTILE`` (97.5%) quantile of the validation scores: its expected false-flag
  rate on new in-distribution images is 2.5%, leaving room below the 5% target for the sampling
  error of a quantile taken from a small validation set and for the spread of the test images.

Files store, per layer, the means and the precision matrix as tensors ``scope.<layer>.means`` and
``scope.<layer>.precision`` and its name, sizes and standardisation in the JSON metadata
(:class:`ScopeMetadata`). Files written before the layers were added hold one penultimate layer as
``scope.means`` / ``scope.precision`` with unstandardised distances; they load as that one layer and
score exactly as before.

:class:`ScopeScorer` is the model and its scope as one traceable module, so an ONNX export
(``serving.export``) computes the score in its graph: the statistics become float64 initializers and
the distances are :func:`min_distance`, the same float64 arithmetic as :meth:`Layer.distance`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from breastvision.errors import BreastvisionError

#: Tensor names in the model file.
SCOPE_PREFIX = "scope."
#: Of files written before per-layer statistics (one penultimate layer).
MEANS_KEY, PRECISION_KEY = f"{SCOPE_PREFIX}means", f"{SCOPE_PREFIX}precision"
METHOD = "mahalanobis"
#: The layer name of the head's input features (``forward_head(..., pre_logits=True)``).
PRE_LOGITS = "pre_logits"
#: The share of validation images the threshold lets through (module docstring).
QUANTILE = 0.975


def min_distance(x: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Per row of N×D ``x``, the smallest Mahalanobis distance to a row of K×D ``means`` under the
    D×D ``precision``, in their dtype. Matrix products, not einsum, so that it exports to ONNX as
    MatMul, which onnxruntime runs in float64."""
    diff = x[:, None, :] - means[None]  # N×K×D
    squared = ((diff @ precision) * diff).sum(-1)
    return squared.clamp_min(0).sqrt().min(1).values


@dataclass
class Layer:
    """One layer's class means (K×D), shared precision matrix (D×D) and the standardisation of its
    distances (``(distance - centre) / spread``)."""

    name: str
    means: torch.Tensor
    precision: torch.Tensor
    centre: float = 0.0
    spread: float = 1.0

    @classmethod
    def fit(cls, name: str, features: np.ndarray, labels: np.ndarray) -> Layer:
        from sklearn.covariance import LedoitWolf

        x = np.asarray(features, np.float64)
        classes = np.unique(labels)
        means = np.stack([x[labels == c].mean(0) for c in classes])
        centred = x - means[np.searchsorted(classes, labels)]
        precision = LedoitWolf(assume_centered=True).fit(centred).precision_
        return cls(name, torch.from_numpy(means).float(), torch.from_numpy(precision).float())

    def distance(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Per row of N×D features, the smallest Mahalanobis distance to a class mean."""
        x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
        return min_distance(x, self.means.double(), self.precision.double()).numpy()

    def standardised(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        return (self.distance(features) - self.centre) / self.spread

    def keys(self) -> tuple[str, str]:
        return f"{SCOPE_PREFIX}{self.name}.means", f"{SCOPE_PREFIX}{self.name}.precision"

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "feature_dim": int(self.means.shape[1]),
                "n_classes": int(self.means.shape[0]), "centre": self.centre, "spread": self.spread}


@dataclass
class Scope:
    """The layers' statistics and the flagging threshold on their combined score."""

    layers: list[Layer]
    threshold: float
    fitted_on: str = "train"
    threshold_from: str = f"validation {QUANTILE:.1%} quantile"
    n_images: int = 0
    #: Validation images the standardisation and the threshold came from.
    n_validation: int | None = field(default=None)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @classmethod
    def fit(cls, features: Mapping[str, np.ndarray], labels: Sequence[int],
            val_features: Mapping[str, np.ndarray]) -> Scope:
        """Fit on training features (``{layer: N×D}``) with their labels; standardisation and threshold
        from the validation features (``{layer: M×D}``, same layers)."""
        y = np.asarray(labels)
        shapes = {name: np.shape(x) for name, x in features.items()}
        if not shapes or any(len(s) != 2 or s[0] != len(y) for s in shapes.values()) or len(y) < 2:
            raise BreastvisionError(f"scope: needs N×D features and a label each, not {shapes}, {y.shape}")
        layers = [Layer.fit(name, x, y) for name, x in features.items()]
        for layer in layers:
            distances = layer.distance(val_features[layer.name])
            layer.centre, layer.spread = float(distances.mean()), float(distances.std()) or 1.0
        scope = cls(layers, 0.0, n_images=len(y), n_validation=len(next(iter(val_features.values()))))
        scope.threshold = float(np.quantile(scope.score(val_features), QUANTILE))
        return scope

    def score(self, features: Mapping[str, np.ndarray | torch.Tensor]) -> np.ndarray:
        """Per image, the sum over layers of its standardised distances (module docstring)."""
        return np.sum([layer.standardised(features[layer.name]) for layer in self.layers], axis=0)

    def outside(self, score: float) -> bool:
        """Whether a score flags its image: above the threshold."""
        return bool(score > self.threshold)

    def metadata(self) -> dict[str, Any]:
        return {"method": METHOD, "threshold": self.threshold, "fitted_on": self.fitted_on,
                "threshold_from": self.threshold_from, "n_images": self.n_images,
                "n_validation": self.n_validation, "layers": [layer.metadata() for layer in self.layers]}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for layer in self.layers:
            means_key, precision_key = layer.keys()
            out[means_key], out[precision_key] = layer.means, layer.precision
        return out

    @classmethod
    def from_file(cls, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None,
                  where: str) -> Scope:
        """From a model file's ``scope`` metadata and tensors, shapes checked (a one-line error).
        ``tensors=None``: the statistics live elsewhere (an ONNX export's graph), and each layer
        holds shape-only tensors (the meta device) with its sizes and standardisation: enough to
        flag by the threshold and describe the scope, not to :meth:`score`."""
        entries = meta.get("layers") or [  # a file from before per-layer statistics
            {"name": PRE_LOGITS, "feature_dim": meta["feature_dim"], "n_classes": meta["n_classes"]}]
        layers = []
        for entry in entries:
            layer = Layer(entry["name"], torch.empty(0), torch.empty(0), float(entry.get("centre", 0.0)),
                          float(entry.get("spread", 1.0)))
            k, d = entry["n_classes"], entry["feature_dim"]
            keys = layer.keys() if meta.get("layers") else (MEANS_KEY, PRECISION_KEY)
            if tensors is None:
                means, precision = torch.empty(k, d, device="meta"), torch.empty(d, d, device="meta")
            else:
                means, precision = (tensors.get(key) for key in keys)
            if means is None or precision is None:
                raise BreastvisionError(f"{where}: scope metadata lacks the {keys[0]}, {keys[1]}")
            if tuple(means.shape) != (k, d) or tuple(precision.shape) != (d, d):
                raise BreastvisionError(
                    f"{where}: scope tensors have shapes {list(means.shape)} and {list(precision.shape)}, "
                    f"expected [{k}, {d}] and [{d}, {d}]")
            layer.means, layer.precision = means.float(), precision.float()
            layers.append(layer)
        return cls(layers, float(meta["threshold"]), meta["fitted_on"], meta["threshold_from"],
                   int(meta["n_images"]), meta.get("n_validation"))


def default_layers(model: nn.Module) -> list[str]:
    """The layers a scope is fitted on (module docstring), by module name, ending with ``PRE_LOGITS``."""
    from timm.models.vision_transformer import VisionTransformer

    from breastvision.models.densenet import DenseNet
    from breastvision.models.resnet import ResNet

    names = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, DenseNet):
            names += [f"{prefix}features.denseblock{i}" for i in (1, 2, 3)]
        elif isinstance(module, ResNet):
            names += [f"{prefix}layer{i}" for i in (1, 2, 3)]
        elif isinstance(module, VisionTransformer):
            depth = len(module.blocks)
            names += [f"{prefix}blocks.{depth * i // 4 - 1}" for i in (1, 2, 3)]
    return [*names, PRE_LOGITS]


def _pooled(output: torch.Tensor) -> torch.Tensor:
    """Global mean: over space (B×C×H×W) or over tokens (B×T×C)."""
    if output.ndim == 4:
        return output.float().mean((2, 3))
    return output.float().mean(1) if output.ndim == 3 else output.float().flatten(1)


class FeatureTap:
    """Forward hooks keeping the pooled outputs of named layers, per thread, so one model serves
    concurrent callers (the web server's workers share it); ``features`` runs a batch through."""

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in layers if n != PRE_LOGITS and n not in modules]
        if missing:
            raise BreastvisionError(f"scope: the model has no layer {', '.join(missing)}")
        self.model, self.layers = model, list(layers)
        self._local = threading.local()
        self._handles = [modules[n].register_forward_hook(self._keeper(n)) for n in layers if n != PRE_LOGITS]

    def _keeper(self, name: str):
        def keep(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
            kept = getattr(self._local, "kept", None)
            if kept is not None:  # only inside ``features``: plain forward passes keep nothing
                kept[name] = _pooled(output)
        return keep

    def pooled(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(logits, {layer: pooled features})`` for one batch, in one forward pass, as tensors
        and without inference mode, so that it traces (:class:`ScopeScorer`)."""
        self._local.kept = {}
        try:
            maps = self.model.forward_features(batch)  # the head is cheap: run twice on the same maps
            logits = self.model.forward_head(maps)
            self._local.kept[PRE_LOGITS] = self.model.forward_head(maps, pre_logits=True).float().flatten(1)
            kept = self._local.kept
        finally:
            self._local.kept = None
        return logits.float(), {n: kept[n] for n in self.layers}

    def features(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        """``(logits, {layer: pooled features})`` for one batch, in one forward pass."""
        with torch.inference_mode():
            logits, kept = self.pooled(batch)
        return logits, {n: v.cpu().numpy() for n, v in kept.items()}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextmanager
def tapped(model: nn.Module, layers: Sequence[str]) -> Iterator[FeatureTap]:
    """A :class:`FeatureTap` for the ``with`` block, its hooks removed afterwards."""
    tap = FeatureTap(model, layers)
    try:
        yield tap
    finally:
        tap.close()


class ScopeScorer(nn.Module):
    """A model and its scope as one module whose ``forward`` gives ``(logits, scope scores)``: B×K
    logits and, per image, :meth:`Scope.score` computed from the same forward pass — traceable, so
    an ONNX export carries the score. The statistics are float64 buffers (the file's float32 values,
    exactly) and the distances float64, as in :meth:`Layer.distance`. Tracing it registers the
    scope's hooks on ``model`` (a :class:`FeatureTap`), which then serves no other caller."""

    def __init__(self, model: nn.Module, scope: Scope) -> None:
        super().__init__()
        self.model, self.scope = model, scope
        self.tap = FeatureTap(model, scope.layer_names)
        # Indexed, not by layer name: buffer names cannot hold the dots of module paths.
        for i, layer in enumerate(scope.layers):
            self.register_buffer(f"means{i}", layer.means.double())
            self.register_buffer(f"precision{i}", layer.precision.double())

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, pooled = self.tap.pooled(image)
        standardised = [
            (min_distance(pooled[layer.name].double(), getattr(self, f"means{i}"),
                          getattr(self, f"precision{i}")) - layer.centre) / layer.spread
            for i, layer in enumerate(self.scope.layers)]
        return logits, torch.stack(standardised).sum(0)
