"""The HED stain space of H&E images (Ruifrok & Johnston 2001) and stain jitter in it (Tellez et al. 2019).

Colour deconvolution: an RGB pixel's optical densities are a fixed mix of haematoxylin, eosin and
DAB stain amounts. :func:`rgb_to_hed` / :func:`hed_to_rgb` use scikit-image's matrix and units
(``skimage.color.rgb2hed``: optical density over ``ln(10⁶)``, so stain amounts of tissue lie
around 0–0.3), batched on torch tensors so they run inside a ``v2`` pipeline. Unlike scikit-image,
negative stain amounts (colours outside the three stains' gamut) are kept rather than clipped to
zero, so that the round trip is the identity on every pixel and a jitter of zero changes nothing.

**Stain jitter** (Tellez et al., "Quantifying the effects of data augmentation and stain color
normalization in convolutional neural networks for computational pathology", Medical Image
Analysis 2019): each stain channel ``s`` becomes ``α·s + β`` with ``α ~ U(1−σ, 1+σ)`` and
``β ~ U(−b, b)`` drawn per image and channel; their "HED-light" setting is σ = b = 0.05. It mimics
the lab-to-lab variation of staining that stain normalisation removes, but as training variety.
"""

from __future__ import annotations

import math

import torch

#: Rows: the RGB optical-density direction of haematoxylin, eosin and DAB (scikit-image's ``rgb_from_hed``).
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
#: scikit-image's unit: optical densities are divided by -ln(1e-6), the density of its darkest pixel.
_LOG_ADJUST = math.log(1e-6)
_DARKEST = 1e-6


def rgb_to_hed(rgb: torch.Tensor) -> torch.Tensor:
    """``…×3×H×W`` float RGB in [0, 1] → stain amounts (H, E, D) in scikit-image's units, unclipped."""
    density = torch.log(rgb.clamp_min(_DARKEST)) / _LOG_ADJUST
    return torch.einsum("...chw,cd->...dhw", density, HED_FROM_RGB.to(rgb.dtype))


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hed`, clipped to [0, 1]."""
    density = torch.einsum("...dhw,dc->...chw", hed, RGB_FROM_HED.to(hed.dtype))
    return torch.exp(density * _LOG_ADJUST).clamp(0.0, 1.0)


def hed_jitter(rgb: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``rgb`` (``…×3×H×W``, float in [0, 1]) with stain channel ``i`` scaled by ``alpha[i]`` and
    shifted by ``beta[i]``; computed in float64 so that ``alpha = 1, beta = 0`` returns ``rgb``
    to float32 rounding."""
    hed = rgb_to_hed(rgb.double())
    jittered = hed * alpha.double().view(3, 1, 1) + beta.double().view(3, 1, 1)
    return hed_to_rgb(jittered).to(rgb.dtype)
