"""Image → tensor transforms: the papers' augmentations, test-time augmentation, and the one
pre-processing path that training, prediction, serving and evaluation share.

**System H (paper 000) — offline dihedral views.** The paper enlarges BreakHis "to 5× the original
data through these 5 ways: rotation by 90°, 180°, 270°, horizontal flip, vertical flip". Five
transforms giving five times the data means the five transformed copies *are* the enlarged set; had
the originals been kept beside them it would be 6×. So :data:`DIHEDRAL_5` holds exactly those five
views and not ``identity``; a run that also wants the original orientation adds ``"identity"``
(every view name below is accepted by :func:`apply_view`). The views are deterministic, so frozen
features can be cached per (image, view), and the splits helper keeps all views of an image on one
side of a patient-disjoint split (the paper split *after* augmenting, which leaks).

**Test-time augmentation.** :func:`dihedral_tta` averages softmax probabilities over the 8 elements
of the dihedral group (:data:`DIHEDRAL_8`): the average is exactly invariant to rotating or flipping
the input, whatever the model.

**System U (paper 003) — online augmentation.** In the paper's order: resize to 256×256, "random crop
and rescale back to 224×224", horizontal and vertical flips (p = 0.5 each), rotation ±15°, colour
jitter (brightness, contrast, saturation 0.2, hue 0.1), translation up to 10 % of width and height,
then tensor and ImageNet normalisation. "Crop and rescale back" is read as torchvision's
``RandomResizedCrop(224)``: a crop of random area and aspect ratio resized to 224 — a fixed 224 crop
of a 256 image would need no rescaling. Its area range is torchvision's default (0.08, 1.0), which
is what ``RandomResizedCrop(224)`` does when the paper names no range; configs may narrow it
(``crop_scale``), e.g. so small lesions are not cropped away. The paper's "expanded 5×" is five
random draws of this pipeline per image; :func:`augmented_view` makes draw ``k`` reproducible so
frozen-branch features can be cached per (image, draw).

**Evaluation.** :func:`eval_transform` is built from the model file's ``Preprocessing`` alone: resize
to ``resize``×``resize`` then centre-crop ``input_size`` (System U: 256 → 224, mirroring training),
or resize straight to ``input_size``×``input_size`` (System H: BreakHis tiles are used whole), then
ImageNet mean/std. Resizes are square, as the paper's "256×256" is, rather than shorter-side.
:func:`preprocess_image` prepends the fitted stain normaliser when there is one; prediction,
serving and evaluation call only it, and training's deterministic path is the same transform, so
training and prediction pre-processing cannot diverge.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2

from breastvision.data.stain import cached_normalizer
from breastvision.errors import BreastvisionError
from breastvision.models.bundle import Preprocessing

ImageOrTensor = Image.Image | torch.Tensor

# PIL transposes and their tensor equivalents on the last two (H, W) dimensions. Rotations are
# counter-clockwise in both, as PIL's and ``torch.rot90``'s are.
_PIL_VIEWS: dict[str, Image.Transpose | None] = {
    "identity": None,
    "rot90": Image.Transpose.ROTATE_90,
    "rot180": Image.Transpose.ROTATE_180,
    "rot270": Image.Transpose.ROTATE_270,
    "hflip": Image.Transpose.FLIP_LEFT_RIGHT,
    "vflip": Image.Transpose.FLIP_TOP_BOTTOM,
    "transpose": Image.Transpose.TRANSPOSE,
    "antitranspose": Image.Transpose.TRANSVERSE,
}
_TENSOR_VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda t: t,
    "rot90": lambda t: torch.rot90(t, 1, (-2, -1)),
    "rot180": lambda t: torch.rot90(t, 2, (-2, -1)),
    "rot270": lambda t: torch.rot90(t, 3, (-2, -1)),
    "hflip": lambda t: t.flip(-1),
    "vflip": lambda t: t.flip(-2),
    "transpose": lambda t: t.transpose(-2, -1),
    "antitranspose": lambda t: torch.rot90(t, 2, (-2, -1)).transpose(-2, -1),
}

#: Paper 000's offline augmentation: the five views that make up its 5× data set (no identity).
DIHEDRAL_5 = ("rot90", "rot180", "rot270", "hflip", "vflip")
#: The whole dihedral group of the square, for test-time augmentation.
DIHEDRAL_8 = ("identity", *DIHEDRAL_5, "transpose", "antitranspose")


def apply_view(image: ImageOrTensor, name: str) -> ImageOrTensor:
    """View ``name`` (one of :data:`DIHEDRAL_8`) of a PIL image or a ``…×H×W`` tensor."""
    if name not in _TENSOR_VIEWS:
        raise BreastvisionError(f"unknown image view '{name}' (choose from {', '.join(DIHEDRAL_8)})")
    if isinstance(image, Image.Image):
        op = _PIL_VIEWS[name]
        return image if op is None else image.transpose(op)
    return _TENSOR_VIEWS[name](image)


def dihedral_tta(
    model: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, views: Sequence[str] = DIHEDRAL_8
) -> torch.Tensor:
    """Softmax probabilities (B×classes) averaged over ``views`` of a B×C×H×W batch.

    One forward pass per view rather than one 8×-larger batch, so memory stays that of a batch.
    """
    probs = [torch.softmax(model(apply_view(batch, name)), dim=1) for name in views]
    return torch.stack(probs).mean(dim=0)


# -- System U training augmentation and deterministic pre-processing -----------------------------


def _as_preprocessing(preprocessing: Preprocessing | Mapping[str, Any]) -> Preprocessing:
    if isinstance(preprocessing, Preprocessing):
        return preprocessing
    return Preprocessing.parse(dict(preprocessing))


def _scale_and_normalize(pre: Preprocessing) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(pre.mean), list(pre.std))]


def eval_transform(preprocessing: Preprocessing | Mapping[str, Any]) -> v2.Compose:
    """The deterministic transform of a model file's ``Preprocessing`` (see the module docstring)."""
    pre = _as_preprocessing(preprocessing)
    if pre.resize is None:
        geometry: list[v2.Transform] = [v2.Resize((pre.input_size, pre.input_size))]
    else:  # Preprocessing guarantees resize >= input_size
        geometry = [v2.Resize((pre.resize, pre.resize)), v2.CenterCrop(pre.input_size)]
    return v2.Compose([v2.ToImage(), *geometry, *_scale_and_normalize(pre)])


def busi_paper_transform(
    preprocessing: Preprocessing | Mapping[str, Any],
    crop_scale: Sequence[float] = (0.08, 1.0),
    flip_p: float = 0.5,
    degrees: float = 15.0,
    brightness: float = 0.2,
    contrast: float = 0.2,
    saturation: float = 0.2,
    hue: float = 0.1,
    translate: float = 0.1,
) -> v2.Compose:
    """Paper 003's training augmentation (defaults), sized by the model's ``Preprocessing``."""
    pre = _as_preprocessing(preprocessing)
    resize = [] if pre.resize is None else [v2.Resize((pre.resize, pre.resize))]
    return v2.Compose(
        [
            v2.ToImage(),
            *resize,
            v2.RandomResizedCrop(pre.input_size, scale=tuple(crop_scale)),
            v2.RandomHorizontalFlip(flip_p),
            v2.RandomVerticalFlip(flip_p),
            v2.RandomRotation(degrees),
            v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue),
            v2.RandomAffine(degrees=0, translate=(translate, translate)),
            *_scale_and_normalize(pre),
        ]
    )


#: Training transforms by the name a config gives them. ``none`` is the deterministic eval
#: transform: System H's augmentation is the offline dihedral views, not an online pipeline.
TRAIN_TRANSFORMS: dict[str, Callable[..., v2.Compose]] = {
    "busi_paper": busi_paper_transform,
    "none": eval_transform,
}


def train_transform(
    augment: str | Mapping[str, Any] | None, preprocessing: Preprocessing | Mapping[str, Any]
) -> v2.Compose:
    """The training transform a config names: ``"busi_paper"`` or ``{"name": "busi_paper", "degrees": 10}``.

    Sizes and normalisation always come from ``preprocessing`` (what the model file records), so
    the training and prediction inputs agree by construction.
    """
    spec = {"name": augment or "none"} if not isinstance(augment, Mapping) else dict(augment)
    name = spec.pop("name", "none")
    if name not in TRAIN_TRANSFORMS:
        raise BreastvisionError(f"unknown augmentation '{name}' (choose from {', '.join(TRAIN_TRANSFORMS)})")
    try:
        return TRAIN_TRANSFORMS[name](preprocessing, **spec)
    except TypeError as err:
        raise BreastvisionError(f"bad parameters for augmentation '{name}': {err}") from err


def augmented_view(transform: Callable[[Any], torch.Tensor], image: ImageOrTensor, seed: int) -> torch.Tensor:
    """``transform(image)`` with torch's CPU generator seeded by ``seed``: draw ``seed`` is reproducible.

    The global generator is forked, so callers' random streams are left as they were.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


def preprocess_image(image: ImageOrTensor, preprocessing: Preprocessing | Mapping[str, Any]) -> torch.Tensor:
    """Stain normalisation (if the model has a fitted normaliser) then :func:`eval_transform`.

    The single pre-processing entry point of prediction, serving and evaluation: give it the RGB
    image (``data.io.load_image``) and the model file's ``preprocessing``; returns a 3×H×W tensor.
    """
    pre = _as_preprocessing(preprocessing)
    if pre.stain is not None:
        image = cached_normalizer(pre.stain).transform(image)
    return eval_transform(pre)(image)
