"""Optimizer parameter groups as DAFormer, HRDA and MIC build them for their DeepLab v2.

Their runs (lhoyer/DAFormer ``experiments.py``: ``opt, lr, schedule, pmult = 'adamw', 0.00006,
'poly10warm', True`` and ``paramwise_cfg.custom_keys = {'head': dict(lr_mult=10.)}``;
``configs/_base_/schedules/adamw.py``: AdamW, ``weight_decay=0.01``) go through mmcv's
``DefaultOptimizerConstructor`` (``mmcv/runner/optimizer/default_constructor.py``, v1.3.7):
a parameter whose name contains a custom key gets that key's ``lr_mult`` and ``decay_mult``
(default 1); no other multiplier is set (``bias_lr_mult``, ``bias_decay_mult``,
``norm_decay_mult`` all 1). For their DeepLab v2 that means two groups: every parameter of
``decode_head`` (weights *and* biases) at 10x the learning rate, everything else (convs and
BN scale/shift of the ResNet) at 1x, all with the same weight decay. The ``'pos_block'`` and
``'norm'`` keys with ``decay_mult=0`` are added only for MiT backbones (``if 'mit' in
backbone``), and mmseg's ResNet names its norms ``bn*``/``stem.N``, so no ResNet parameter is
exempt from decay.

This differs from :meth:`deeplabv2.model.DeepLabV2.param_groups` (the DeepLab Caffe solver:
head biases 20x without decay, BN without decay), which stays what it is for the other
methods.
"""

from __future__ import annotations

from torch import nn


def mmseg_param_groups(model: nn.Module, lr: float, weight_decay: float = 0.01,
                       head_lr_mult: float = 10.0) -> list[dict]:
    """``[backbone group, head group]`` of ``model`` (a :class:`~deeplabv2.model.DeepLabV2`)
    as mmcv's constructor makes them with ``custom_keys={'head': dict(lr_mult=head_lr_mult)}``:
    the head (and a multi-level ``aux_head``, which mmseg would also name ``*head``) at
    ``head_lr_mult`` x ``lr``, the backbone at ``lr``, every trainable parameter exactly once,
    all with ``weight_decay``. Each group carries ``name`` and ``lr_mult`` as ``param_groups``'
    do, so the same schedule code sets ``group["lr"] = lr_mult * base_lr``."""
    heads = [model.head] + ([model.aux_head] if getattr(model, "aux_head", None) is not None
                            else [])
    head_ids = {id(p) for h in heads for p in h.parameters()}
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    head = [p for h in heads for p in h.parameters() if p.requires_grad]
    groups = []
    for name, params, mult in (("backbone", backbone, 1.0), ("head", head, head_lr_mult)):
        if params:
            groups.append({"name": name, "params": params, "lr": lr * mult, "lr_mult": mult,
                           "weight_decay": weight_decay})
    return groups
