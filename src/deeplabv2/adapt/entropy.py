"""Entropy terms of ADVENT (Vu et al., CVPR 2019) and FDA (Yang & Soatto, CVPR 2020).

Every map is normalised by ``log C`` so that it lies in ``[0, 1]`` whatever the number of
classes, as both papers do; except that FDA's released code divides by the constant
:data:`FDA_ENTROPY_DIVISOR` whatever the number of classes (see :func:`charbonnier_entropy`).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def self_information(logits: torch.Tensor) -> torch.Tensor:
    """ADVENT's weighted self-information map ``-p log p / log C``: ``(N, C, h, w)`` scores ->
    ``(N, C, h, w)``, the AdvEnt discriminator's input (Eq. 5). Zero where ``p = 0``."""
    c = logits.shape[1]
    p = F.softmax(logits, dim=1)
    return -p * F.log_softmax(logits, dim=1) / math.log(c)


def entropy_map(logits: torch.Tensor) -> torch.Tensor:
    """Normalised Shannon entropy per position: ``(N, C, h, w)`` -> ``(N, h, w)`` in [0, 1]."""
    return self_information(logits).sum(1)


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """ADVENT's MinEnt term (Eq. 3): the mean normalised entropy over positions and images.
    The released ``entropy_loss`` (advent/utils/loss.py) is ``-sum(p log2(p + 1e-30)) /
    (n h w log2 C)``: the same value (``log2 p / log2 C = ln p / ln C``), up to rounding and its
    1e-30 floor. :class:`~deeplabv2.adapt.methods.MinEnt` gives it the scores upsampled to the
    input, as ADVENT does."""
    return entropy_map(logits).mean()


# FDA's released entropy divisor: ``ent / 2.9444`` (ln 19 = 2.94444 to five digits) in
# ``model/deeplab.py``, ``model/fcn8s.py`` and ``model/CLS.py`` of YanchaoYang/FDA, commented
# "change when classes is not 19" but used unchanged for its 16-class SYNTHIA runs too.
FDA_ENTROPY_DIVISOR = 2.9444


def charbonnier_entropy(logits: torch.Tensor, eta: float = 2.0, eps: float = 1e-8,
                        divisor: float | None = None) -> torch.Tensor:
    """FDA's robust entropy (Sec. 3.2, a Charbonnier penalty): ``mean((E^2 + eps) ** eta)`` of
    the entropy map ``E``. With ``eta > 0.5`` high-entropy pixels are penalised more than
    low-entropy ones; the released code uses ``eta = 2`` (``--ita``) and ``eps = 1e-8``.
    ``E`` is the Shannon entropy divided by ``divisor``, by ``log C`` when None (in [0, 1]);
    the FDA method passes :data:`FDA_ENTROPY_DIVISOR`, as the released code divides."""
    if divisor is None:
        ent = entropy_map(logits)
    else:
        ent = -(F.softmax(logits, dim=1) * F.log_softmax(logits, dim=1)).sum(1) / divisor
    return ((ent ** 2 + eps) ** eta).mean()
