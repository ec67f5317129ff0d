"""The model file: weights plus everything needed to use them, in one safetensors file.

A ``.safetensors`` file holds the state dict; its string metadata holds one JSON document with the
architecture and its arguments, class names, the exact pre-processing (input size, resize,
normalisation, the fitted stain normaliser), the weights' lineage (ImageNet → LC25000 → BreakHis,
each with its checkpoint and data) and the validation metrics shown on the model card. Safetensors
rather than a pickle so that opening a model file received from elsewhere cannot run code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from breastvision.errors import BreastvisionError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FORMAT_VERSION = 1
_META_KEY = "breastvision"


@dataclass
class Preprocessing:
    """How an image becomes the model's input tensor, at prediction time.

    ``resize`` is the side the image is resized to before a centre crop of ``input_size``
    (``None``: resize straight to ``input_size``). ``stain`` is a fitted stain normaliser's state
    (``{"method": "macenko", ...}``) or ``None``.
    """

    input_size: int = 224
    resize: int | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    stain: dict[str, Any] | None = None


@dataclass
class ModelBundle:
    architecture: str
    class_names: list[str]
    state_dict: dict[str, torch.Tensor]
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    #: Oldest first: ``{"stage": ..., "weights": ..., "data": ..., "checkpoint": ..., "split": ...}``.
    lineage: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        """Everything but the weights, as a JSON-able dict (also written into ONNX exports)."""
        return {
            "format_version": FORMAT_VERSION,
            "architecture": self.architecture,
            "model_kwargs": self.model_kwargs,
            "class_names": self.class_names,
            "preprocessing": asdict(self.preprocessing),
            "lineage": self.lineage,
            "metrics": self.metrics,
            "extra": self.extra,
        }

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict.items()}
        save_file(tensors, str(path), metadata={_META_KEY: json.dumps(self.metadata())})
        return path

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> ModelBundle:
        pre = dict(meta.get("preprocessing", {}))
        for key in ("mean", "std"):
            if key in pre:
                pre[key] = tuple(pre[key])
        return cls(
            architecture=meta["architecture"],
            class_names=list(meta["class_names"]),
            state_dict=state_dict,
            model_kwargs=meta.get("model_kwargs", {}),
            preprocessing=Preprocessing(**pre),
            lineage=meta.get("lineage", []),
            metrics=meta.get("metrics", {}),
            extra=meta.get("extra", {}),
        )

    @classmethod
    def load(cls, path: str | Path) -> ModelBundle:
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise BreastvisionError(f"model file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                raw = (handle.metadata() or {}).get(_META_KEY)
            state_dict = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise BreastvisionError(f"{path} is not a breastvision model file: {err}") from err
        if raw is None:
            raise BreastvisionError(f"{path} is a safetensors file without breastvision metadata")
        return cls.from_metadata(json.loads(raw), state_dict)

    def build_model(self) -> torch.nn.Module:
        """The architecture with these weights loaded, in eval mode."""
        from breastvision.models.registry import create_model

        model = create_model(
            self.architecture, num_classes=len(self.class_names), pretrained=None, **self.model_kwargs
        )
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as err:  # missing/unexpected keys or shapes: weights of another model
            detail = " ".join(str(err).split())[:300]
            raise BreastvisionError(
                f"model file weights do not match architecture '{self.architecture}': {detail}"
            ) from err
        return model.eval()
