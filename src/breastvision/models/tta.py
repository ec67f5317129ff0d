"""Which test-time augmentation views a model averages by default, from how it was trained.

A model file (``models.bundle``) names the view set ``--tta`` averages (its ``tta``: ``dihedral8``,
the 8 rotations and flips, or ``hflip``, the image and its mirror; the views are
``data.transforms.TTA_VIEWS``), chosen when it was trained: the config's ``data.tta`` when set, else
by the modality of the training data (the lineage entry's ``modality``, which the readers know:
:data:`MODALITY_TTA`). An ultrasound has a depth axis (skin at the top) and its models train on the
image and its mirror only, so a rotated or upside-down scan is nothing they have seen; a
histology field has no up or down. Files written before the field get the set of the modality they
record (:func:`recorded_modality`: the lineage's ``modality``, else the data set it names, else
histology when a stain normaliser or a µm/px scale is stored), and ``dihedral8`` when it is unknown,
as every file was averaged before.

Free of torch, so the command-line parsers can list the sets without importing it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, get_args

#: The named view sets (module docstring; their views: ``data.transforms.TTA_VIEWS``).
TtaSet = Literal["dihedral8", "hflip"]
TTA_SETS: tuple[str, ...] = get_args(TtaSet)
#: The modalities readers record in ``Catalog.meta["modality"]`` (other data: unknown).
ULTRASOUND, HISTOLOGY = "ultrasound", "histology"
#: The view set of a model trained on each imaging modality (module docstring).
MODALITY_TTA = {ULTRASOUND: "hflip", HISTOLOGY: "dihedral8"}
#: The set of a model whose modality is unknown: what every model averaged before the sets had names.
DEFAULT_TTA = "dihedral8"
#: The set whose views every set holds (the image and its mirror are among the 8 dihedral views).
NARROWEST_TTA = "hflip"
#: The modality of the data sets that files written before ``modality`` name in their lineage.
_DATASET_MODALITY = {"busi": ULTRASOUND, "breakhis": HISTOLOGY, "breakhis_samples": HISTOLOGY,
                     "lc25000": HISTOLOGY}


def tta_for(modality: str | None) -> str:
    """The view set a model trained on ``modality`` data averages (:data:`MODALITY_TTA`)."""
    return MODALITY_TTA.get(modality or "", DEFAULT_TTA)


def common_tta(sets: Iterable[str]) -> str:
    """The set of models averaged together (an ensemble): theirs when they agree, else the one whose
    views all of them accept (:data:`NARROWEST_TTA`)."""
    found = set(sets)
    return found.pop() if len(found) == 1 else NARROWEST_TTA


def recorded_modality(meta: dict[str, Any]) -> str | None:
    """The imaging modality a model file's metadata records (module docstring), ``None``: unknown;
    an ensemble's is its members' when they agree."""
    if meta.get("ensemble"):
        found = {recorded_modality(member) for member in meta["ensemble"]["members"]}
        return found.pop() if len(found) == 1 else None
    stage = (meta.get("lineage") or [{}])[-1]
    if stage.get("modality"):
        return str(stage["modality"])
    named = _DATASET_MODALITY.get(str(stage.get("data", "")).split(" (")[0])
    pre = meta.get("preprocessing") or {}
    return named or (HISTOLOGY if pre.get("stain") or pre.get("mpp") else None)
