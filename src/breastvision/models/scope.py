"""A model's scope: what its inputs looked like in training, so that an input far outside is flagged
("outside this model's scope") rather than given a confident label.

Method: class-conditional Gaussians with one shared covariance on the pooled penultimate features
(``forward_head(forward_features(x), pre_logits=True)``), the Mahalanobis detector of Lee et al.
(NeurIPS 2018). The score of an input is its smallest Mahalanobis distance to a class mean. Why this
rather than an energy score (logsumexp of the logits): the energy sees only the K logits, and a
classifier trained on two or three classes maps most off-domain images to some confident logit
vector, while the 1024- or 1216-dimensional features keep far more of what an image looks like.
Why a shared covariance: it needs one covariance estimate, not one per class, and some classes have
fewer images than the features have dimensions; even so the sample covariance is singular, hence the
Ledoit-Wolf shrinkage (``sklearn.covariance.LedoitWolf``), which picks the shrinkage analytically,
with no parameter to tune.

Fitted on the training images (identity view); the threshold is the 95th percentile of the
validation images' scores, so about 5% of in-distribution images are flagged by construction — the
test images measure it. The means and the precision matrix are tensors of the model file
(``scope.means``, ``scope.precision``); its JSON metadata holds the rest (:class:`ScopeMetadata`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from breastvision.errors import BreastvisionError

#: Tensor names in the model file.
SCOPE_PREFIX = "scope."
MEANS_KEY, PRECISION_KEY = f"{SCOPE_PREFIX}means", f"{SCOPE_PREFIX}precision"
METHOD = "mahalanobis"
#: The share of validation images the threshold lets through.
QUANTILE = 0.95


@dataclass
class Scope:
    """Class means (K×D), the shared precision matrix (D×D) and the flagging threshold."""

    means: torch.Tensor
    precision: torch.Tensor
    threshold: float
    fitted_on: str = "train"
    threshold_from: str = f"validation {QUANTILE:.0%} quantile"
    n_images: int = 0

    @classmethod
    def fit(cls, features: np.ndarray, labels: Sequence[int], val_features: np.ndarray) -> Scope:
        """Fit on training features (N×D) with their labels; threshold from validation features."""
        from sklearn.covariance import LedoitWolf

        x, y = np.asarray(features, np.float64), np.asarray(labels)
        if x.ndim != 2 or len(x) != len(y) or len(x) < 2:
            raise BreastvisionError(f"scope: needs N×D features and a label each, not {x.shape}, {y.shape}")
        classes = np.unique(y)
        means = np.stack([x[y == c].mean(0) for c in classes])
        centred = x - means[np.searchsorted(classes, y)]
        precision = LedoitWolf(assume_centered=True).fit(centred).precision_
        scope = cls(torch.from_numpy(means).float(), torch.from_numpy(precision).float(), 0.0,
                    n_images=len(x))
        scope.threshold = float(np.quantile(scope.score(val_features), QUANTILE))
        return scope

    def score(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Per row of N×D features, the smallest Mahalanobis distance to a class mean."""
        x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
        diff = x[:, None, :] - self.means.double()[None]  # N×K×D
        squared = torch.einsum("nkd,de,nke->nk", diff, self.precision.double(), diff)
        return squared.clamp_min(0).sqrt().min(1).values.numpy()

    def outside(self, score: float) -> bool:
        """Whether a score flags its image: above the threshold."""
        return bool(score > self.threshold)

    def metadata(self) -> dict[str, Any]:
        return {"method": METHOD, "threshold": self.threshold, "fitted_on": self.fitted_on,
                "threshold_from": self.threshold_from, "n_images": self.n_images,
                "feature_dim": int(self.means.shape[1]), "n_classes": int(self.means.shape[0])}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {MEANS_KEY: self.means, PRECISION_KEY: self.precision}

    @classmethod
    def from_file(cls, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], where: str) -> Scope:
        """From a model file's ``scope`` metadata and tensors, shapes checked (a one-line error)."""
        means, precision = tensors.get(MEANS_KEY), tensors.get(PRECISION_KEY)
        if means is None or precision is None:
            raise BreastvisionError(f"{where}: scope metadata lacks the {MEANS_KEY}, {PRECISION_KEY}")
        k, d = meta["n_classes"], meta["feature_dim"]
        if tuple(means.shape) != (k, d) or tuple(precision.shape) != (d, d):
            raise BreastvisionError(
                f"{where}: scope tensors have shapes {list(means.shape)} and {list(precision.shape)}, "
                f"expected [{k}, {d}] and [{d}, {d}]")
        return cls(means.float(), precision.float(), float(meta["threshold"]), meta["fitted_on"],
                   meta["threshold_from"], int(meta["n_images"]))


def pooled_features(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, pooled penultimate features)`` for one batch, in one forward pass."""
    with torch.inference_mode():
        pooled = model.forward_features(batch)  # the head is cheap: run twice on the same maps
        logits, features = model.forward_head(pooled), model.forward_head(pooled, pre_logits=True)
    return logits.float(), features.float().flatten(1)
