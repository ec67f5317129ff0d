"""Grad-CAM heat-maps for the CNNs, the ViTs and both branches of the fusion model.

The CAM arithmetic is pytorch-grad-cam's (``grad-cam`` on PyPI); this module only decides *where*
to look and how to show it:

- **Target layers** come from the architecture name (:data:`TARGET_LAYERS`), and can be overridden
  with dotted module paths (``"features.denseblock4"``, ``"vit.blocks.-1.norm1"``; negative numbers
  index from the end). DenseNet: the output of the last dense block, the finest map that still
  carries the deepest features (the brief and the SE variant's attention both end there). ResNet:
  ``layer4``. GoogLeNet: ``inception5b``. ViT: the first LayerNorm of the last encoder block —
  pytorch-grad-cam's recommendation, since the last block's *output* tokens are, for a class-token
  model, only read through the class token and so carry no spatial gradient.
- **Tokens → grid.** A ViT's tokens are reshaped to the patch grid (14×14 at 224×224 with 16×16
  patches), dropping the class token / register tokens (timm's ``num_prefix_tokens``), so the same
  channel-weighted Grad-CAM applies. Attention rollout is not offered: timm's fused attention never
  materialises the attention matrix, and Grad-CAM is class-specific where rollout is not.
- **Fusion model.** One heat-map per branch (``cnn`` and ``vit``), each the Grad-CAM of the *fused*
  class score with respect to that branch's layer, and a ``combined`` map: the mean of the two
  per-branch maps, each first scaled to [0, 1] — exactly pytorch-grad-cam's own aggregation over
  several target layers, computed from the two maps already in hand instead of a third pass.
- **Overlays** are drawn on the *original* image: the heat-map covers the region the model actually
  saw (after resize and centre crop, see :func:`input_region`), mapped back to original pixels.

Grad-CAM registers hooks on the model, so one model must not be explained from two threads at once;
the web server keeps a separate copy for explanations behind a lock.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import (
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    XGradCAM,
)
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.image import scale_cam_image, show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from breastvision.errors import BreastvisionError
from breastvision.models.bundle import Preprocessing

#: CAM methods by name; all share pytorch-grad-cam's ``BaseCAM`` interface.
METHODS: dict[str, type[BaseCAM]] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "hirescam": HiResCAM,
    "layercam": LayerCAM,
    "eigencam": EigenCAM,
}

#: Architecture family → candidate target layers, first one present wins (see the module docstring).
TARGET_LAYERS: dict[str, tuple[str, ...]] = {
    "densenet": ("features.denseblock4", "denseblock4"),
    "resnet": ("layer4",),
    "googlenet": ("inception5b",),
    "vit": ("blocks.-1.norm1",),
}

#: Attribute names under which a fusion model keeps its branches, and the heat-map each one gives.
FUSION_BRANCHES: tuple[str, ...] = ("cnn", "vit")


@dataclass
class Explanation:
    """Heat-maps for one image, each H×W in [0, 1] at the model's input resolution.

    ``heatmaps`` is ordered with the primary map first (``combined`` for the fusion model).
    ``probabilities`` come from the same forward pass that produced the maps.
    """

    target: int
    heatmaps: dict[str, np.ndarray]
    probabilities: np.ndarray
    method: str
    layers: dict[str, list[str]]

    @property
    def primary(self) -> np.ndarray:
        return next(iter(self.heatmaps.values()))


def resolve_module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """The sub-module at a dotted path; integer parts index containers, negative ones from the end."""
    module = model
    for part in path.split("."):
        if part.lstrip("-").isdigit() and isinstance(module, torch.nn.Sequential | torch.nn.ModuleList):
            index = int(part)
            if not -len(module) <= index < len(module):
                raise BreastvisionError(f"target layer '{path}': index {index} out of range")
            module = module[index]
        elif hasattr(module, part) and isinstance(getattr(module, part), torch.nn.Module):
            module = getattr(module, part)
        else:
            raise BreastvisionError(
                f"target layer '{path}': {type(module).__name__} has no sub-module '{part}' "
                f"(children: {', '.join(name for name, _ in module.named_children()) or 'none'})"
            )
    return module


def _family(module: torch.nn.Module, architecture: str | None) -> str | None:
    """The architecture family: from the name when it says, else from the module's structure."""
    name = (architecture or "").lower()
    # Fusion first: "fusion_resnet18_vitb16" also names its branches' families.
    if "fusion" in name or all(hasattr(module, b) for b in FUSION_BRANCHES):
        return "fusion"
    for family in TARGET_LAYERS:
        if family in name:
            return family
    for family, candidates in TARGET_LAYERS.items():
        for candidate in candidates:
            try:
                resolve_module(module, candidate)
                return family
            except BreastvisionError:
                continue
    return None


def _first_present(module: torch.nn.Module, family: str) -> str:
    for candidate in TARGET_LAYERS[family]:
        try:
            resolve_module(module, candidate)
            return candidate
        except BreastvisionError:
            continue
    raise BreastvisionError(
        f"none of the {family} target layers {TARGET_LAYERS[family]} exists in {type(module).__name__}; "
        "name one with --target-layer"
    )


def default_target_layers(model: torch.nn.Module, architecture: str | None = None) -> dict[str, list[str]]:
    """Heat-map name → target layer paths, chosen from the architecture (see :data:`TARGET_LAYERS`)."""
    family = _family(model, architecture)
    if family == "fusion":
        layers = {}
        for branch in FUSION_BRANCHES:
            sub = resolve_module(model, branch)
            sub_family = _family(sub, None)
            if sub_family is None or sub_family == "fusion":
                raise BreastvisionError(f"cannot tell the architecture of the fusion branch '{branch}'")
            layers[branch] = [f"{branch}.{_first_present(sub, sub_family)}"]
        return layers
    if family is None:
        raise BreastvisionError(
            f"no default Grad-CAM layer for architecture '{architecture}'; name one with --target-layer"
        )
    return {"gradcam": [_first_present(model, family)]}


def _owning_vit(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
    """The ViT (a module with ``patch_embed``) that the layer at ``path`` belongs to, if any."""
    parts = path.split(".")
    for cut in range(len(parts), -1, -1):
        owner = resolve_module(model, ".".join(parts[:cut])) if cut else model
        if hasattr(owner, "patch_embed"):
            return owner
    return None


def token_reshape(vit: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A reshape_transform turning B×N×C tokens into B×C×h×w maps, prefix tokens dropped."""
    prefix = int(getattr(vit, "num_prefix_tokens", 1 if getattr(vit, "cls_token", None) is not None else 0))
    grid = getattr(getattr(vit, "patch_embed", None), "grid_size", None)

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 3:  # a CNN layer's map passes through unchanged
            return tokens
        patches = tokens[:, prefix:, :]
        count = patches.shape[1]
        height, width = grid if grid and grid[0] * grid[1] == count else (math.isqrt(count),) * 2
        if height * width != count:
            raise BreastvisionError(f"cannot arrange {count} ViT tokens on a square grid")
        return patches.reshape(patches.shape[0], height, width, patches.shape[2]).permute(0, 3, 1, 2)

    return reshape


def _cam_map(
    model: torch.nn.Module, x: torch.Tensor, layers: Sequence[str], target: int | None, method: str
) -> tuple[np.ndarray, torch.Tensor]:
    modules = [resolve_module(model, path) for path in layers]
    vits = {id(v): v for v in (_owning_vit(model, path) for path in layers) if v is not None}
    if len(vits) > 1:
        raise BreastvisionError("target layers from two different ViTs must be explained separately")
    reshape = token_reshape(next(iter(vits.values()))) if vits else None
    cam = METHODS[method](model=model, target_layers=modules, reshape_transform=reshape)
    try:
        targets = None if target is None else [ClassifierOutputTarget(target)]
        heatmap = cam(input_tensor=x, targets=targets)[0]
        return heatmap.astype(np.float32), cam.outputs.detach()
    finally:
        # Not ``with cam``: its __exit__ swallows IndexError; hooks must go whatever happens.
        cam.activations_and_grads.release()


def explain(
    model: torch.nn.Module,
    tensor: torch.Tensor,
    *,
    architecture: str | None = None,
    target: int | None = None,
    target_layers: Sequence[str] | None = None,
    method: str = "gradcam",
) -> Explanation:
    """Heat-maps for one pre-processed image (C×H×W or 1×C×H×W) and the class ``target``.

    ``target`` defaults to the predicted class. ``target_layers`` overrides the defaults with dotted
    module paths and gives a single ``gradcam`` map. Must not run under ``torch.inference_mode``.
    """
    if method not in METHODS:
        raise BreastvisionError(f"unknown explanation method '{method}' (choose from {', '.join(METHODS)})")
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 4 or tensor.shape[0] != 1:
        raise BreastvisionError(f"explain takes one image, got a tensor of shape {tuple(tensor.shape)}")
    if torch.is_inference_mode_enabled():
        raise BreastvisionError("Grad-CAM needs gradients: call explain outside torch.inference_mode")
    from breastvision.models.ensemble import EnsembleNetwork

    if isinstance(model, EnsembleNetwork):
        return _explain_ensemble(model, tensor, target, target_layers, method)
    layers = {"gradcam": list(target_layers)} if target_layers else default_target_layers(model, architecture)
    device = next(model.parameters()).device
    # The input requires grad so that the graph reaches the target layer even with frozen weights.
    x = tensor.detach().to(device).clone().requires_grad_(True)
    heatmaps: dict[str, np.ndarray] = {}
    logits = None
    with torch.enable_grad():
        for name, paths in layers.items():
            heatmaps[name], out = _cam_map(model, x, paths, target, method)
            if logits is None:
                logits = out
                target = int(logits[0].argmax()) if target is None else target
    if len(heatmaps) > 1:
        combined = np.mean(np.stack([np.maximum(h, 0) for h in heatmaps.values()]), axis=0)
        heatmaps = {"combined": scale_cam_image(combined[None])[0], **heatmaps}
    probabilities = torch.softmax(logits[0].float(), dim=0).cpu().numpy()
    return Explanation(int(target), heatmaps, probabilities, method, layers)


def _explain_ensemble(
    model: torch.nn.Module, tensor: torch.Tensor, target: int | None, target_layers: Sequence[str] | None,
    method: str,
) -> Explanation:
    """An ensemble's map: the mean of its members' primary maps for the ensemble's class (each member
    explained with its own default layers), followed by each member's."""
    with torch.no_grad():
        probabilities = model(tensor.to(model.temperatures.device)).exp()[0].cpu().numpy()
    target = int(probabilities.argmax()) if target is None else target
    parts = [explain(member, tensor, architecture=architecture, target=target, target_layers=target_layers,
                     method=method) for member, architecture in zip(model.members, model.architectures,
                                                                    strict=True)]
    heatmaps = {"ensemble": np.mean(np.stack([p.primary for p in parts]), axis=0).astype(np.float32)}
    heatmaps.update({f"member{i}": p.primary for i, p in enumerate(parts)})
    layers = {f"member{i}.{name}": paths for i, p in enumerate(parts) for name, paths in p.layers.items()}
    return Explanation(target, heatmaps, probabilities, method, layers)


def input_region(size: tuple[int, int], preprocessing: Preprocessing) -> tuple[float, float, float, float]:
    """The box (left, top, right, bottom) of an image of ``size`` that the model input covers.

    Pre-processing resizes to ``resize``×``resize`` (or straight to ``input_size``) and takes a
    centre crop of ``input_size``; the crop, scaled back, is this box in original pixels.
    """
    width, height = size
    side = preprocessing.resize or preprocessing.input_size
    offset = round((side - preprocessing.input_size) / 2)
    scale_x, scale_y = width / side, height / side
    return (
        offset * scale_x,
        offset * scale_y,
        (offset + preprocessing.input_size) * scale_x,
        (offset + preprocessing.input_size) * scale_y,
    )


def overlay(
    image: Image.Image, heatmap: np.ndarray, preprocessing: Preprocessing, image_weight: float = 0.55
) -> Image.Image:
    """The heat-map (JET colours) blended over the original image, inside the region the model saw."""
    rgb = image.convert("RGB")
    left, top, right, bottom = (round(v) for v in input_region(rgb.size, preprocessing))
    box_w, box_h = max(right - left, 1), max(bottom - top, 1)
    heat = Image.fromarray(np.clip(heatmap * 255, 0, 255).astype(np.uint8))
    heat = heat.resize((box_w, box_h), Image.Resampling.BILINEAR)
    crop = np.asarray(rgb.crop((left, top, left + box_w, top + box_h)), dtype=np.float32) / 255
    blended = show_cam_on_image(crop, np.asarray(heat, dtype=np.float32) / 255, use_rgb=True,
                                image_weight=image_weight)
    out = rgb.copy()
    out.paste(Image.fromarray(blended), (left, top))
    return out


def save_overlays(
    image: Image.Image, explanation: Explanation, preprocessing: Preprocessing, out_dir: Path, stem: str
) -> dict[str, Path]:
    """One PNG per heat-map, ``<stem>_<map>.png`` in ``out_dir``; returns map name → path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, heatmap in explanation.heatmaps.items():
        path = out_dir / f"{stem}_{name}.png"
        overlay(image, heatmap, preprocessing).save(path)
        paths[name] = path
    return paths
