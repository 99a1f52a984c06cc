"""Ensembles of checkpoints: the members' softmax outputs averaged.

This is FDA's multi-band ensemble (FDA-MBT, Yang & Soatto, CVPR 2020): three networks trained
with ``adapt.fda_beta`` 0.01, 0.05 and 0.09, each run on the image, their class probabilities
(softmax of the logits at the input size) averaged with equal weights and the average
upsampled to the labels. :class:`Ensemble` is a network like any other here: its output is the
*logarithm* of the averaged probabilities, so that ``softmax(output)`` gives back exactly that
average and ``argmax`` the ensemble's class, and every test-time mode (sliding windows, MSC,
averaged scales, flip, the CRF) runs on it as on one model. With ``upsample=False`` it averages
the stride-8 probabilities (what test-time MSC fuses).

``deeplabv2 evaluate A.pth --ensemble B.pth C.pth`` and ``deeplabv2 predict`` take it from the
command line. The members must agree on what their outputs mean and how their input is made:
class count and names, preprocessing and alignment convention; a member that differs is an
error naming its file.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..model.deeplab import NetworkWrapper

#: probabilities are floored here before the logarithm (a class no member gives any
#: probability stays the least likely, without -inf in the output)
FLOOR = 1e-30


class Ensemble(NetworkWrapper):
    """Equal-weight average of the softmax outputs of ``members`` (networks taking the same
    preprocessed input, e.g. :class:`deeplabv2.model.DeepLabV2` or the result of
    :func:`deeplabv2.deploy.fast.optimize_for_inference`); ``names`` (e.g. their files) label the
    members in errors and in :meth:`extra_repr`."""

    def __init__(self, members: Sequence[nn.Module], names: Sequence[str] | None = None):
        members = list(members)
        if not members:
            raise ValueError("an ensemble needs at least one member")
        names = [str(n) for n in names] if names is not None else [
            f"member {i}" for i in range(len(members))]
        if len(names) != len(members):
            raise ValueError(f"{len(names)} names for {len(members)} members")
        first = members[0]
        for name, member in zip(names[1:], members[1:]):
            _require_compatible(names[0], first, name, member)
        super().__init__(first)  # config, preprocessing, classes... of the first
        self.members = nn.ModuleList(members)
        self.names = names

    def forward(self, x: torch.Tensor, upsample: bool = True) -> torch.Tensor:
        total = None
        for member in self.members:
            probs = F.softmax(member(x, upsample=upsample).float(), dim=1)
            total = probs if total is None else total + probs
        return (total / len(self.members)).clamp_min(FLOOR).log()

    def extra_repr(self) -> str:
        return "softmax average of " + ", ".join(self.names)


def _describe_preprocessing(model) -> dict | None:
    p = getattr(model, "preprocessing", None)
    return None if p is None else p.to_dict()


def _require_compatible(name_a: str, a: nn.Module, name_b: str, b: nn.Module) -> None:
    """Raise ``ValueError`` naming ``name_b`` where member ``b`` cannot be averaged with ``a``."""
    if int(a.num_classes) != int(b.num_classes):
        raise ValueError(f"ensemble: {name_b} has {b.num_classes} classes, {name_a} has "
                         f"{a.num_classes}")
    ca, cb = getattr(a, "classes", None), getattr(b, "classes", None)
    if ca and cb and list(ca) != list(cb):
        diff = [f"{i}: {x!r} vs {y!r}" for i, (x, y) in enumerate(zip(cb, ca)) if x != y]
        raise ValueError(f"ensemble: {name_b} names its classes otherwise than {name_a} ("
                         + ", ".join(diff[:3]) + ")")
    pa, pb = _describe_preprocessing(a), _describe_preprocessing(b)
    if pa != pb:
        raise ValueError(f"ensemble: {name_b} expects other preprocessing than {name_a} "
                         f"({pb} vs {pa}); its members must share one input")
    la = getattr(getattr(a, "alignment", None), "name", None)
    lb = getattr(getattr(b, "alignment", None), "name", None)
    if la != lb:
        raise ValueError(f"ensemble: {name_b} uses the {lb!r} alignment, {name_a} {la!r}; "
                         f"load them with one --alignment")
