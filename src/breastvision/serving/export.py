"""ONNX export of a model file, with the model file's metadata inside the ONNX file.

The exported graph takes a B×3×S×S float batch named ``image`` (already pre-processed: the stain
normaliser and resize stay in Python, shared with ``predict``) and returns softmax ``probabilities``
of shape B×K; the batch axis is dynamic. ``metadata_props`` holds the same JSON document as the
model file (key ``breastvision``) plus how it was exported (key ``breastvision_onnx``), so an ONNX
file alone is enough for ``breastvision predict``.

A model file with a scope (``models.scope``) exports with a second output, ``scope_score`` (B,
float64): each image's out-of-scope score, computed in the graph (``models.scope.ScopeScorer``:
the class means and precision matrices are float64 initializers). The scope's own metadata
(threshold, layers' names, sizes and standardisation) goes under its own key, ``breastvision_scope``,
not into the model document, whose ``scope`` entry would promise tensors an ONNX file does not
hold: releases that predate the output read such a file as one without a scope.

Exporter choice: torch's dynamo exporter (``torch.export`` → onnxscript) is the maintained path but
emits opset 18 or newer; opset 17 is still asked for by older runtimes, so ``opset=17`` uses the
TorchScript exporter, which torch keeps as deprecated. Both are checked the same way:
``onnx.checker`` and, unless ``verify=False``, onnxruntime against PyTorch on a random batch: the
probabilities within :data:`TOLERANCE`, the scope scores within :data:`SCOPE_TOLERANCE`.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np
import torch

from breastvision.errors import BreastvisionError
from breastvision.models.bundle import ModelBundle
from breastvision.models.scope import Scope, ScopeScorer
from breastvision.paths import file_sha256
from breastvision.serving.predict import (
    INPUT_NAME,
    ONNX_METADATA_KEY,
    OUTPUT_NAME,
    SCOPE_METADATA_KEY,
    SCOPE_OUTPUT,
)

log = logging.getLogger(__name__)

MIN_OPSET = 17
DEFAULT_OPSET = 18
#: Largest PyTorch–onnxruntime probability difference accepted by the post-export check.
TOLERANCE = 1e-4
#: Largest PyTorch–onnxruntime scope score difference accepted, relative to the score where it
#: exceeds 1 (a score is a sum of distances in units of the validation images' spread, so below 1
#: the bound is absolute: 1e-4 of a spread). Both sides compute the distances in float64 from the
#: same float32 network; what differs is the network's float32 rounding under each runtime's
#: kernels, which moves pooled features by parts in a million.
SCOPE_TOLERANCE = 1e-4


class _WithSoftmax(torch.nn.Module):
    """The model followed by a softmax, so every ONNX consumer gets probabilities; with a scope,
    also each image's scope score (:class:`~breastvision.models.scope.ScopeScorer`)."""

    def __init__(self, model: torch.nn.Module, scope: Scope | None = None) -> None:
        super().__init__()
        self.model = model if scope is None else ScopeScorer(model, scope)
        self.scoped = scope is not None

    def forward(self, image: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not self.scoped:
            return torch.softmax(self.model(image), dim=1)
        logits, score = self.model(image)
        return torch.softmax(logits, dim=1), score


@dataclass
class ExportResult:
    path: Path
    opset: int
    max_abs_diff: float | None
    #: The scope scores' largest difference (:data:`SCOPE_TOLERANCE`'s measure); ``None``: no scope
    #: or not verified.
    scope_diff: float | None = None


#: Loggers the exporters narrate every graph pass on (at INFO, which the CLI shows).
EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")


@contextmanager
def _quiet_exporters() -> Iterator[None]:
    """Exporter chatter off (stdout prints, per-pass log lines, deprecation warnings); their
    warnings and errors still show."""
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        with warnings.catch_warnings(), redirect_stdout(StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _torch_export(module: torch.nn.Module, example: torch.Tensor, out: Path, opset: int,
                  outputs: list[str]) -> None:
    with _quiet_exporters():
        if opset >= 18:
            torch.onnx.export(
                module, (example,), str(out), input_names=[INPUT_NAME], output_names=outputs,
                opset_version=opset, dynamo=True, external_data=False,
                dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=4096)}},
            )
        else:
            torch.onnx.export(
                module, (example,), str(out), input_names=[INPUT_NAME], output_names=outputs,
                opset_version=opset, dynamo=False,
                dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *outputs)},
            )


def export_onnx(
    model_file: str | os.PathLike, out: str | os.PathLike, opset: int = DEFAULT_OPSET, verify: bool = True,
    device: str = "cpu",
) -> ExportResult:
    """Export a model file to ONNX at ``out``; raises ``BreastvisionError`` if any check fails.
    Tracing runs on the CPU (the graph is the same); ``device`` is where onnxruntime verifies it."""
    import onnx

    from breastvision.devices import resolve_device

    torch_device = resolve_device(device)
    if opset < MIN_OPSET:
        raise BreastvisionError(f"--opset must be {MIN_OPSET} or newer, not {opset}")
    model_file, out = Path(model_file), Path(out)
    if out.suffix.lower() != ".onnx":
        raise BreastvisionError(f"the ONNX file name must end in .onnx: {out}")
    bundle = ModelBundle.load(model_file)
    module = _WithSoftmax(bundle.build_model(), bundle.scope).eval()
    outputs = [OUTPUT_NAME, *([SCOPE_OUTPUT] if bundle.scope is not None else [])]
    size = bundle.preprocessing.input_size
    # Batch 2 when tracing, so no exporter can mistake the batch axis for a constant 1.
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    out.parent.mkdir(parents=True, exist_ok=True)
    _torch_export(module, example, out, opset, outputs)

    proto = onnx.load(str(out))
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise BreastvisionError(f"the exporter wrote opset {written}, not the requested {opset}")
    for key, value in _metadata_props(bundle, model_file, opset).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(proto, str(out))
    try:
        onnx.checker.check_model(str(out), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise BreastvisionError(f"the exported ONNX model fails onnx.checker: {err}") from None

    diff, scope_diff = _verify(module, bundle.scope, out, example, torch_device) if verify else (None, None)
    if diff is not None and diff > TOLERANCE:
        raise BreastvisionError(
            f"onnxruntime and PyTorch disagree by {diff:.2e} (> {TOLERANCE:g}) on a random batch"
        )
    if scope_diff is not None and scope_diff > SCOPE_TOLERANCE:
        raise BreastvisionError(f"onnxruntime and PyTorch scope scores disagree by {scope_diff:.2e} "
                                f"(> {SCOPE_TOLERANCE:g}, relative) on a random batch")
    return ExportResult(out, opset, diff, scope_diff)


def _metadata_props(bundle: ModelBundle, model_file: Path, opset: int) -> dict[str, Any]:
    """The ONNX file's ``metadata_props`` (module docstring), by key."""
    export_info = {
        "opset": opset, "input": INPUT_NAME, "output": OUTPUT_NAME, "torch": torch.__version__,
        "source_file": model_file.name, "source_sha256": file_sha256(model_file),
        **({"scope_output": SCOPE_OUTPUT} if bundle.scope is not None else {}),
    }
    # The scope's statistics are in the graph; its description has a key of its own.
    props = {ONNX_METADATA_KEY: {k: v for k, v in bundle.metadata().items() if k != "scope"},
             f"{ONNX_METADATA_KEY}_onnx": export_info}
    if bundle.scope is not None:
        props[SCOPE_METADATA_KEY] = bundle.scope.metadata()
    return props


def _verify(module: _WithSoftmax, scope: Scope | None, out: Path, example: torch.Tensor,
            device: torch.device) -> tuple[float, float | None]:
    """Largest absolute probability difference between onnxruntime (on ``device``) and PyTorch (on
    the CPU) on ``example``, and with a scope, the scores' largest difference (relative where a
    score exceeds 1: :data:`SCOPE_TOLERANCE`) from :meth:`Scope.score` of PyTorch's features."""
    from breastvision.serving.predict import OnnxPredictor

    with torch.inference_mode():
        expected = module(example)
    expected = expected[0] if scope is not None else expected
    # The graph's own output: the predictor's calibration (the model file's temperature) comes after it.
    logits, scores = OnnxPredictor(out, device).scored(example)
    diff = float(np.abs(logits.exp().numpy() - expected.numpy()).max())
    if scope is None:
        return diff, None
    # As the PyTorch predictor scores: the tap's features, the scope's own float64 distances.
    reference = scope.score(module.model.tap.features(example)[1])
    return diff, float((np.abs(scores - reference) / np.maximum(1.0, np.abs(reference))).max())
