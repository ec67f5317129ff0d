"""breastvision: train, evaluate, explain and serve breast-cancer image classifiers.

The Python API (``breastvision.api``; documented there and in ``examples/python_api.py``)::

    import breastvision
    model = breastvision.load_model("runs/busi_f1/model.safetensors")
    model.predict("image.png").label

Names are imported on first use (PEP 562), so ``import breastvision`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name → the module that defines it.
_EXPORTS = {
    "load_model": "breastvision.api",
    "Model": "breastvision.api",
    "Result": "breastvision.api",
    "Explanation": "breastvision.api",
    "train": "breastvision.api",
    "load_config": "breastvision.training.config",
    "ExperimentConfig": "breastvision.training.config",
    "RunRecord": "breastvision.training.run_record",
    "run_crossval": "breastvision.training.crossval",
    "run_chain": "breastvision.training.transfer",
    "evaluate_model": "breastvision.evaluation.evaluate",
    "BreastvisionError": "breastvision.errors",
}

__all__ = [
    "__version__", "load_model", "Model", "Result", "Explanation", "train", "load_config", "ExperimentConfig",
    "RunRecord", "run_crossval", "run_chain", "evaluate_model", "BreastvisionError",
]

if TYPE_CHECKING:
    from breastvision.api import Explanation, Model, Result, load_model, train
    from breastvision.errors import BreastvisionError
    from breastvision.evaluation.evaluate import evaluate_model
    from breastvision.training.config import ExperimentConfig, load_config
    from breastvision.training.crossval import run_crossval
    from breastvision.training.run_record import RunRecord
    from breastvision.training.transfer import run_chain


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'breastvision' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
