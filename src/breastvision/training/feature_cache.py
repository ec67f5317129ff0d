"""Outputs of a frozen model prefix, computed once per image view and reused.

When the first stages of a model are frozen (``freezing.freeze_before``), their output for a given
image view never changes during training, so it is computed once and training runs only the
trainable suffix on the cached tensors. On a 2-core CPU this is what turns hours into minutes.

The cache changes nothing but speed: a view is a deterministic function of (image, view, seed)
(``training.views``), the prefix is in eval mode (BatchNorm uses its fixed running statistics) and
runs under the same autocast as the uncached path, so training on cached features gives the same
result as running the prefix every step — exactly with the eager backend, within the ONNX Runtime
backend's checked tolerance otherwise (below; ``tests/test_training_engine.py`` checks both).

A prefix's output is one tensor, or a tuple of tensors (a fusion cut inside its branches yields
``(cnn_map, vit_tokens)``, ``FusionNet.split_branches``); :func:`features` stacks each part over
the views and hands back the same structure.

On disk each entry is one safetensors file (key ``x`` for one tensor, ``x0``, ``x1``, … for the
parts of a tuple), named by the SHA-256 of everything its value depends on: the prefix's weights
and buffers (``module_hash``), the run's pre-processing and view recipe (``context``: input size,
normalisation, stain normaliser state, view kind and seed; the engine adds the architecture and
the split point), the image file (path, size, modification time) and the view name. Change any of
them and the entry is simply not found. One file per image view rather than one per run so that the
folds of a cross-validation, or a second run with another split, reuse what the first computed.

**Compute backend.** Computing the prefix is the cost of a cold run. On CPU in float32 the prefix
is exported to ONNX (TorchScript exporter, dynamic batch) and run by ONNX Runtime, whose graph
optimisations and fused kernels beat eager PyTorch on these prefixes (``bench/bench_cache.py``
measures both). Before ORT computes anything, its output for the first images is compared with the
eager prefix's; beyond ``ONNX_TOLERANCE`` (the largest difference, relative to the output's scale,
:func:`scaled_difference`), or if the export or the
session fails, the run computes eagerly and ``backend_note`` says why; so does a run with too few
views to compute to repay the export. Elsewhere (CUDA, autocast) the prefix runs eagerly.

The backend is deliberately *not* part of the cache key: the two backends' features agree within
``ONNX_TOLERANCE`` (checked on the first images of every run that computes; ``bench/bench_cache.py``
reports the largest difference over all its images): float32 rounding noise, which moves training
results no more than any other change of summation order would (the engine's cached-equals-uncached
test bounds it for both), so a cache filled by one backend is reused by the other, not recomputed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from breastvision.data.dicom import split_frame
from breastvision.training.progress import progress_bar

log = logging.getLogger(__name__)

#: Largest ONNX Runtime − eager output difference (:func:`scaled_difference`) accepted before ORT
#: computes a run's features.
ONNX_TOLERANCE = 1e-4
#: Images per ONNX Runtime call: activations of a few images stay in the CPU's caches.
_ONNX_BATCH = 8
#: Images on which ORT is checked against the eager prefix.
_CHECK_IMAGES = 4
#: The export takes seconds: fewer views than this are computed sooner eagerly.
ONNX_MIN_VIEWS = 64
BACKENDS = ("onnxruntime", "eager")

#: A prefix's output: one tensor, or a tuple of tensors (per view, or stacked over views).
Features = torch.Tensor | tuple[torch.Tensor, ...]


def module_hash(module: nn.Module) -> str:
    """SHA-256 of a module's class, parameter and buffer names, shapes, dtypes and values."""
    digest = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def scaled_difference(a: Features, b: Features) -> float:
    """Largest ``|a − b|`` over each part divided by ``max(1, max |b|)``: the absolute difference for
    outputs of unit scale, the relative one beyond. Float32 rounding is relative to the values' size,
    and a ViT's token stream carries entries in the hundreds (about 500 for ViT-Tiny after ten blocks,
    where ORT and eager differ by 1e-3, 2e-6 of that)."""
    return max(
        float((x - y.float()).abs().max()) / max(1.0, float(y.abs().max()))
        for x, y in zip(_parts(a), _parts(b), strict=True)
    )


def _file_identity(path: Path) -> str:
    stat = split_frame(path)[0].stat()  # a DICOM frame: its file's
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


class FeatureCache:
    """Frozen-prefix outputs for a list of image views, in memory and (optionally) on disk.

    ``context`` is every setting besides the weights and the image that changes a view's pixels
    (pre-processing, view recipe and seed); it must be JSON-able. ``backend`` is the one wanted
    (see the module docstring); after computing, ``backend`` is the one used (``None`` when every
    entry was reused), ``backend_note`` why it differs from the one wanted, and ``max_abs_diff`` the
    largest absolute ORT-versus-eager difference checked (the check is :func:`scaled_difference`).
    A first computation of fewer than ``onnx_min_views`` (default ``ONNX_MIN_VIEWS``) views runs
    eagerly.
    """

    def __init__(
        self,
        prefix: nn.Module,
        directory: str | os.PathLike | None,
        context: dict[str, Any],
        progress: bool = False,
        backend: str = "onnxruntime",
        onnx_min_views: int | None = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"unknown feature-cache backend {backend!r} (one of {BACKENDS})")
        self.prefix = prefix
        self.progress = progress
        self.wanted = backend
        self.onnx_min_views = ONNX_MIN_VIEWS if onnx_min_views is None else onnx_min_views
        self.backend: str | None = None
        self.backend_note: str | None = None
        self.max_abs_diff: float | None = None
        self._run: Callable[[torch.Tensor], Features] | None = None  # chosen once, on first use
        self.namespace = hashlib.sha256(
            (module_hash(prefix) + json.dumps(context, sort_keys=True, default=str)).encode()
        ).hexdigest()
        self.directory = Path(directory).expanduser() / self.namespace[:24] if directory else None
        self.hits = 0
        self.computed = 0

    def _entry(self, image: Path, view: str) -> Path:
        assert self.directory is not None
        key = hashlib.sha256(f"{_file_identity(image)}|{view}".encode()).hexdigest()
        return self.directory / key[:2] / f"{key}.safetensors"

    def features(
        self,
        dataset: Dataset,
        images: Sequence[Path],
        views: Sequence[str],
        fabric: Any,
        batch_size: int,
        num_workers: int = 0,
        describe: str = "features",
    ) -> Features:
        """The prefix's output for every item of ``dataset`` (item ``i`` is view ``views[i]`` of
        ``images[i]``), stacked on the CPU in float32: a tensor, or a tuple of them (one per part).

        With a directory, each process of a distributed run computes its share of the missing
        entries and writes them, batch by batch (an interrupted run keeps what it computed); all then
        read them back. Without one, each process computes all.
        """
        n = len(images)
        entries = [self._entry(p, v) for p, v in zip(images, views, strict=True)] if self.directory else None
        missing = [i for i in range(n) if entries is None or not entries[i].is_file()]
        if entries is not None:
            # One process's view of what is missing, so no entry is skipped because another process
            # had already written it when this one looked.
            missing = fabric.broadcast(missing, src=0)
        mine = missing[fabric.global_rank :: fabric.world_size] if entries else missing
        self.hits = n - len(missing)
        computed = self._compute(dataset, mine, fabric, batch_size, num_workers, describe, entries)
        self.computed = len(missing)
        if entries is None:
            return _stack([computed[i] for i in range(n)])
        fabric.barrier()
        return _stack([computed[i] if i in computed else _load(entries[i]) for i in range(n)])

    @torch.no_grad()
    def _compute(
        self,
        dataset: Dataset,
        indices: list[int],
        fabric: Any,
        batch_size: int,
        num_workers: int,
        describe: str,
        entries: list[Path] | None,
    ) -> dict[int, Features]:
        out: dict[int, Features] = {}
        if not indices:
            return out
        self.prefix.eval()
        loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers)
        with progress_bar(fabric, len(loader), f"caching {describe}", self.progress) as bar:
            for x, _y, idx in loader:
                x = fabric.to_device(x)
                self._run = self._run or self._runner(x, fabric, len(indices))
                feats = self._run(x)
                parts = [part.float().cpu() for part in _parts(feats)]
                for b, j in enumerate(idx.tolist()):
                    # Cloned: a slice would keep its whole batch alive.
                    value = tuple(part[b].clone() for part in parts)
                    out[j] = value if isinstance(feats, tuple) else value[0]
                    if entries is not None:
                        _atomic_save(out[j], entries[j])
                bar.advance()
        return out

    def _runner(self, x: torch.Tensor, fabric: Any, views: int) -> Callable[[torch.Tensor], Features]:
        """How this run computes the prefix: ORT if wanted, possible and within tolerance of eager."""

        def eager(batch: torch.Tensor) -> Features:
            with fabric.autocast():
                return self.prefix(batch)

        self.backend = "eager"
        if self.wanted == "eager":
            return eager
        if views < self.onnx_min_views:
            self.backend_note = f"{views} views to compute: too few to repay the ONNX export"
            return eager
        if x.device.type != "cpu":
            self.backend_note = f"ONNX Runtime is used on CPU only; features computed on {x.device.type}"
            return eager
        try:
            onnx = OnnxPrefix(self.prefix, x)
            check = x[:_CHECK_IMAGES]
            got, expected = onnx(check), eager(check)
            pairs = zip(_parts(got), _parts(expected), strict=True)
            self.max_abs_diff = max(float((a - b.float()).abs().max()) for a, b in pairs)
            difference = scaled_difference(got, expected)
        except Exception as err:  # any exporter or runtime failure: eager still gives the features
            self.backend_note = f"ONNX export or run failed ({type(err).__name__}: {err}); computed eagerly"
            log.warning("feature cache: %s", self.backend_note)
            return eager
        if not difference <= ONNX_TOLERANCE:
            self.backend_note = (
                f"ONNX Runtime differed from eager by {self.max_abs_diff:.2e} ({difference:.2e} of the "
                f"output's scale, > {ONNX_TOLERANCE:g}); "
                "computed eagerly"
            )
            log.warning("feature cache: %s", self.backend_note)
            return eager
        self.backend = "onnxruntime"
        return onnx


class OnnxPrefix:
    """A module (one tensor in; one tensor or a tuple of them out) exported to ONNX and run by ONNX
    Runtime on CPU, with as many threads as torch uses; called like the module on float32 CPU tensors."""

    def __init__(self, module: nn.Module, example: torch.Tensor) -> None:
        import onnxruntime as ort

        # Two images when tracing, so the exporter cannot mistake the batch axis for a constant 1.
        example = example[:2] if len(example) > 1 else example.expand(2, *example.shape[1:])
        with torch.no_grad():
            probe = module(example.float())
        self.single = not isinstance(probe, tuple)
        outputs = ["y"] if self.single else [f"y{k}" for k in range(len(probe))]
        buffer = io.BytesIO()
        # The exporter narrates its passes on stdout and warns about its own deprecation: keep quiet.
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, (example.float(),), buffer, input_names=["x"], output_names=outputs,
                opset_version=17, dynamo=False,
                dynamic_axes={name: {0: "batch"} for name in ["x", *outputs]},
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> Features:
        run = self.session.run
        chunks = [run(None, {"x": chunk.float().contiguous().numpy()}) for chunk in x.split(_ONNX_BATCH)]
        outputs = tuple(torch.cat([torch.from_numpy(c[k]) for c in chunks]) for k in range(len(chunks[0])))
        return outputs[0] if self.single else outputs


def _parts(value: Features) -> tuple[torch.Tensor, ...]:
    return value if isinstance(value, tuple) else (value,)


def _stack(values: list[Features]) -> Features:
    """Per-view values stacked over views, part by part."""
    if isinstance(values[0], tuple):
        return tuple(torch.stack(column) for column in zip(*values, strict=True))
    return torch.stack(values)


def _load(path: Path) -> Features:
    tensors = load_file(str(path))
    return tensors["x"] if "x" in tensors else tuple(tensors[f"x{k}"] for k in range(len(tensors)))


def _atomic_save(value: Features, path: Path) -> None:
    """Write then rename, so a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    if isinstance(value, tuple):
        save_file({f"x{k}": part.contiguous() for k, part in enumerate(value)}, tmp)
    else:
        save_file({"x": value.contiguous()}, tmp)
    os.replace(tmp, path)
