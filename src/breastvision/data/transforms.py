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

**Test-time augmentation.** Predictors average softmax probabilities over :func:`view_logits`, the
outputs on one named view set (:data:`TTA_VIEWS`): ``dihedral8``, the 8 elements of the dihedral
group (:data:`DIHEDRAL_8`), whose average is exactly invariant to rotating or flipping the input,
whatever the model (histology: a field has no up or down); or ``hflip``, the image and its mirror
(ultrasound: depth runs top-down, and its models train on exactly those two views). Which set a
model file averages by default is recorded in it (``models.tta``).

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

**Mild presets for cached views.** With frozen, cached branches the paper's crops (down to 8 % of
the area) give features unlike any test image's; :func:`ultrasound_mild_transform` and
:func:`histology_mild_transform` keep each draw close to the evaluated image: the evaluation
geometry plus small perturbations a scan or a slide really shows. Ultrasound gets horizontal flips
only (depth runs top-down, so a vertical flip makes an image no probe produces), ±10° rotation,
0.9–1.1 scale, 5 % translation, ±0.1 brightness and contrast. Histology has no up or down: any of
the 8 dihedral views (:class:`RandomDihedral`), a zoom of up to ~12 % (crop area 0.8–1) and stain
jitter in HED space (:class:`HedJitter`, Tellez et al. 2019, ``data.hed``).

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
from torchvision import tv_tensors
from torchvision.transforms import v2

from breastvision.data.hed import hed_jitter
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
#: Test-time augmentation view sets by name (``models.tta.TTA_SETS``), each starting with the
#: image as given (the training engine scores the other views of validation images apart).
TTA_VIEWS: dict[str, tuple[str, ...]] = {"dihedral8": DIHEDRAL_8, "hflip": ("identity", "hflip")}


def tta_views(name: str | None) -> tuple[str, ...]:
    """The views test-time augmentation set ``name`` averages (``None``: the image alone); an
    unknown name is a one-line error listing the sets."""
    if name is None:
        return ("identity",)
    if name not in TTA_VIEWS:
        raise BreastvisionError(f"unknown test-time augmentation view set '{name}' "
                                f"(choose from {', '.join(TTA_VIEWS)})")
    return TTA_VIEWS[name]


def describe_tta(name: str | None) -> str:
    """How reports name a view set: ``hflip (identity, hflip)``, or ``none``."""
    return "none" if name is None else f"{name} ({', '.join(tta_views(name))})"


def apply_view(image: ImageOrTensor, name: str) -> ImageOrTensor:
    """View ``name`` (one of :data:`DIHEDRAL_8`) of a PIL image or a ``…×H×W`` tensor."""
    if name not in _TENSOR_VIEWS:
        raise BreastvisionError(f"unknown image view '{name}' (choose from {', '.join(DIHEDRAL_8)})")
    if isinstance(image, Image.Image):
        op = _PIL_VIEWS[name]
        return image if op is None else image.transpose(op)
    return _TENSOR_VIEWS[name](image)


def view_logits(
    model: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, views: Sequence[str] = DIHEDRAL_8
) -> torch.Tensor:
    """V×B×classes: ``model``'s outputs on each of ``views`` of a B×C×H×W batch; test-time
    augmentation averages their softmaxes (``serving.predict.Predictor.assess``).

    One forward pass per view rather than one 8×-larger batch, so memory stays that of a batch.
    """
    return torch.stack([model(apply_view(batch, name)) for name in views])


# -- System U training augmentation and deterministic pre-processing -----------------------------


def _as_preprocessing(preprocessing: Preprocessing | Mapping[str, Any]) -> Preprocessing:
    if isinstance(preprocessing, Preprocessing):
        return preprocessing
    return Preprocessing.parse(dict(preprocessing))


def _scale_and_normalize(pre: Preprocessing) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(pre.mean), list(pre.std))]


def _resize(pre: Preprocessing) -> list[v2.Transform]:
    side = pre.resize or pre.input_size
    return [v2.Resize((side, side))]


def _centre_crop(pre: Preprocessing) -> list[v2.Transform]:
    # Preprocessing guarantees resize >= input_size
    return [] if pre.resize is None else [v2.CenterCrop(pre.input_size)]


def eval_transform(preprocessing: Preprocessing | Mapping[str, Any]) -> v2.Compose:
    """The deterministic transform of a model file's ``Preprocessing`` (see the module docstring)."""
    pre = _as_preprocessing(preprocessing)
    return v2.Compose([v2.ToImage(), *_resize(pre), *_centre_crop(pre), *_scale_and_normalize(pre)])


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


def ultrasound_mild_transform(
    preprocessing: Preprocessing | Mapping[str, Any],
    flip_p: float = 0.5,
    degrees: float = 10.0,
    scale: Sequence[float] = (0.9, 1.1),
    translate: float = 0.05,
    brightness: float = 0.1,
    contrast: float = 0.1,
) -> v2.Compose:
    """Mild ultrasound augmentation (module docstring): the evaluation geometry with a horizontal
    flip and a small affine before the centre crop, then brightness and contrast."""
    pre = _as_preprocessing(preprocessing)
    return v2.Compose(
        [
            v2.ToImage(),
            *_resize(pre),
            v2.RandomHorizontalFlip(flip_p),
            v2.RandomAffine(degrees=degrees, translate=(translate, translate), scale=tuple(scale)),
            *_centre_crop(pre),
            v2.ColorJitter(brightness=brightness, contrast=contrast),
            *_scale_and_normalize(pre),
        ]
    )


class RandomDihedral(v2.Transform):
    """One of the 8 views of :data:`DIHEDRAL_8`, uniformly (masks get the same one)."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"view": DIHEDRAL_8[int(torch.randint(len(DIHEDRAL_8), ()))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, Image.Image):
            return apply_view(inpt, params["view"])
        out = apply_view(inpt.as_subclass(torch.Tensor), params["view"])
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


class HedJitter(v2.Transform):
    """Stain jitter (``data.hed``): per image, HED channel ``i`` scaled by ``U(1−sigma, 1+sigma)`` and
    shifted by ``U(−bias, bias)``. Takes float RGB in [0, 1] (after ``ToDtype``); masks pass through."""

    _transformed_types = (tv_tensors.Image, lambda inpt: type(inpt) is torch.Tensor)

    def __init__(self, sigma: float = 0.05, bias: float = 0.01) -> None:
        super().__init__()
        self.sigma, self.bias = sigma, bias

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        alpha = 1 + (torch.rand(3) * 2 - 1) * self.sigma
        return {"alpha": alpha, "beta": (torch.rand(3) * 2 - 1) * self.bias}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not inpt.is_floating_point():
            raise BreastvisionError("HedJitter takes float RGB in [0, 1]: put it after ToDtype(scale=True)")
        out = hed_jitter(inpt.as_subclass(torch.Tensor), params["alpha"], params["beta"])
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


def histology_mild_transform(
    preprocessing: Preprocessing | Mapping[str, Any],
    dihedral: bool = True,
    crop_scale: Sequence[float] = (0.8, 1.0),
    hed_sigma: float = 0.05,
    hed_bias: float = 0.01,
) -> v2.Compose:
    """Mild histology augmentation (module docstring): the evaluation geometry, a random dihedral
    view, a square crop of ``crop_scale`` of the area resized back, then HED stain jitter.

    ``hed_bias`` is in scikit-image's current HED units (``data.hed``), in which tissue's stain
    amounts lie around 0–0.3; Tellez et al.'s 0.05 was stated in the older, different units of
    scikit-image at the time, and 0.05 here would shift pixels by about 40 grey levels on average.
    """
    pre = _as_preprocessing(preprocessing)
    side = pre.input_size
    return v2.Compose(
        [
            v2.ToImage(),
            *_resize(pre),
            *_centre_crop(pre),
            *([RandomDihedral()] if dihedral else []),
            v2.RandomResizedCrop(side, scale=tuple(crop_scale), ratio=(1.0, 1.0)),
            v2.ToDtype(torch.float32, scale=True),
            HedJitter(hed_sigma, hed_bias),
            v2.Normalize(list(pre.mean), list(pre.std)),
        ]
    )


#: Training transforms by the name a config gives them. ``none`` is the deterministic eval
#: transform: System H's augmentation is the offline dihedral views, not an online pipeline.
TRAIN_TRANSFORMS: dict[str, Callable[..., v2.Compose]] = {
    "busi_paper": busi_paper_transform,
    "ultrasound_mild": ultrasound_mild_transform,
    "histology_mild": histology_mild_transform,
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
