"""Ensembles of checkpoints: the members' softmax outputs averaged, or their logits summed.

``fuse="probs"`` (the default) is FDA's multi-band ensemble (FDA-MBT, Yang & Soatto, CVPR
2020): three networks trained with ``adapt.fda_beta`` 0.01, 0.05 and 0.09, each run on the
image, their class probabilities (softmax of the logits at the input size) averaged with equal
weights and the average upsampled to the labels. :class:`Ensemble` is a network like any other
here: with probabilities its output is the *logarithm* of the averaged probabilities, so that
``softmax(output)`` gives back exactly that average and ``argmax`` the ensemble's class, and
every test-time mode (sliding windows, MSC, averaged scales, flip, the CRF) runs on it as on one
model. With ``upsample=False`` it averages the stride-8 probabilities (what test-time MSC fuses).

``fuse="logits"`` is ADVENT's AdvEnt+MinEnt (45.5 mIoU GTA5 -> Cityscapes): the released
eval_UDA.py ``eval_single`` adds ``MODEL_WEIGHT[i] * interp(model_i(image)[1])``, each
member's main-classifier scores upsampled to the label size (no softmax), and takes the
argmax; configs/advent+minent_pretrained.yml weights the AdvEnt and the MinEnt model 0.5 and
0.5. The output is that weighted sum of logits (bilinear upsampling is linear, so summing
before or after it is the same).

``weights`` (one per member; default equal, ``1 / n``) weight the sum of logits as given, and
the average of probabilities normalised by their sum.

``deeplabv2 evaluate A.pth --ensemble B.pth C.pth`` and ``deeplabv2 predict`` take it from the
command line (``--ensemble-fuse``, ``--ensemble-weights``). The members must agree on what
their outputs mean and how their input is made: class count and names, preprocessing and
alignment convention; a member that differs is an error naming its file.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..model.deeplab import NetworkWrapper

#: probabilities are floored here before the logarithm (a class no member gives any
#: probability stays the least likely, without -inf in the output)
FLOOR = 1e-30


FUSES = ("probs", "logits")


class Ensemble(NetworkWrapper):
    """The members' softmax outputs averaged (``fuse="probs"``) or their logits summed with
    ``weights`` (``fuse="logits"``), ``members`` networks taking the same preprocessed input
    (e.g. :class:`deeplabv2.model.DeepLabV2` or the result of
    :func:`deeplabv2.deploy.fast.optimize_for_inference`); ``names`` (e.g. their files) label the
    members in errors and in :meth:`extra_repr`; ``weights`` one positive number per member
    (default ``1 / n`` each)."""

    def __init__(self, members: Sequence[nn.Module], names: Sequence[str] | None = None,
                 fuse: str = "probs", weights: Sequence[float] | None = None):
        members = list(members)
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if fuse not in FUSES:
            raise ValueError(f"ensemble fuse={fuse!r}; valid: {', '.join(FUSES)}")
        names = [str(n) for n in names] if names is not None else [
            f"member {i}" for i in range(len(members))]
        if len(names) != len(members):
            raise ValueError(f"{len(names)} names for {len(members)} members")
        if weights is None:
            weights = [1.0 / len(members)] * len(members)
        weights = [float(w) for w in weights]
        if len(weights) != len(members):
            raise ValueError(f"ensemble: {len(weights)} weights for {len(members)} members "
                             f"({', '.join(names)})")
        for name, w in zip(names, weights):
            if not (math.isfinite(w) and w > 0):
                raise ValueError(f"ensemble: the weight of {name} must be a positive number, "
                                 f"got {w}")
        first = members[0]
        for name, member in zip(names[1:], members[1:]):
            _require_compatible(names[0], first, name, member)
        super().__init__(first)  # config, preprocessing, classes... of the first
        self.members = nn.ModuleList(members)
        self.names = names
        self.fuse = fuse
        self.weights = weights

    def forward(self, x: torch.Tensor, upsample: bool = True,
                fuse: str | None = None) -> torch.Tensor:
        """The fused output of the members on ``x``; ``fuse`` ("probs" or "logits") overrides
        the ensemble's own for this call (an evaluation protocol fixes where its script
        fuses)."""
        fuse = fuse or self.fuse
        if fuse not in FUSES:
            raise ValueError(f"ensemble fuse={fuse!r}; valid: {', '.join(FUSES)}")
        total = None
        for member, w in zip(self.members, self.weights):
            out = member(x, upsample=upsample).float()
            term = w * (out if fuse == "logits" else F.softmax(out, dim=1))
            total = term if total is None else total + term
        if fuse == "logits":
            return total
        return (total / sum(self.weights)).clamp_min(FLOOR).log()

    def extra_repr(self) -> str:
        what = "softmax average" if self.fuse == "probs" else "sum of logits"
        equal = len(set(self.weights)) == 1 and self.fuse == "probs"
        members = ", ".join(self.names) if equal else ", ".join(
            f"{w:g} x {n}" for w, n in zip(self.weights, self.names))
        return f"{what} of {members}"


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
