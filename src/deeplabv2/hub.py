"""The public builders: a DeepLab v2 network, optionally with weights, in one call.

``deeplabv2_resnet101(num_classes=19, weights="DeepLab_resnet_pretrained_imagenet.pth")``
builds the architecture (:func:`deeplabv2.model.build_model`) and loads any file
:func:`deeplabv2.load_weights` accepts. They live above both the network (:mod:`.model`) and
the loader (:mod:`.weights`), which builds networks itself, so neither imports the other's
user. :func:`from_pretrained` rebuilds a model from a model folder (``deeplabv2 export-hub``)
on disk or on the Hugging Face Hub.
"""

from __future__ import annotations

import re
from pathlib import Path

from .model.alignment import get_alignment
from .model.preprocessing import MMSEG_RGB
from .model.deeplab import DEFAULT_RATES, LARGEFOV_RATES, RESNET_DEPTHS, DeepLabV2, build_model
from .weights import load_model, load_weights


def _with_weights(model: DeepLabV2, weights, head: str, alignment) -> DeepLabV2:
    if weights is not None:
        load_weights(model, weights, head=head, alignment=alignment)
    elif alignment is not None:
        model.alignment = get_alignment(alignment)
    return model


def deeplabv2_resnet101(num_classes: int = 19, *, weights=None,
                        frozen_bn: bool | None = None, atrous_rates=DEFAULT_RATES,
                        head: str = "auto", head_mode: str = "aspp", alignment=None,
                        bn: str | None = None) -> DeepLabV2:
    """DeepLab v2 with the atrous ResNet-101 (the paper's main model).

    ``weights`` is a path to any layout :func:`deeplabv2.load_weights` accepts; the model then
    follows that file's backbone layout and preprocessing. ``bn``: "frozen" (default),
    "batch" (batch statistics in training, frozen affine: the released UDA codes) or "train"
    (trainable BN, for training from scratch; the older ``frozen_bn=False``). ``head`` is
    passed to ``load_weights``.
    ``head_mode="adaptsegnet"`` sums ASPP branches 0+1 only, as AdaptSegNet-trained files need.
    ``alignment`` (``"caffe"``, the default, or ``"pytorch"``): see
    :mod:`deeplabv2.model.alignment`; None keeps the convention a checkpoint of ours records.
    """
    model = build_model({"backbone": "resnet", "blocks": RESNET_DEPTHS[101],
                         "num_classes": num_classes, "frozen_bn": frozen_bn, "bn": bn,
                         "atrous_rates": atrous_rates, "head_mode": head_mode})
    return _with_weights(model, weights, head, alignment)


def deeplabv2_resnet50(num_classes: int = 19, *, weights=None,
                       frozen_bn: bool | None = None, atrous_rates=DEFAULT_RATES,
                       head: str = "auto", head_mode: str = "aspp", alignment=None,
                       bn: str | None = None) -> DeepLabV2:
    """DeepLab v2 with an atrous ResNet-50 backbone."""
    model = build_model({"backbone": "resnet", "blocks": RESNET_DEPTHS[50],
                         "num_classes": num_classes, "frozen_bn": frozen_bn, "bn": bn,
                         "atrous_rates": atrous_rates, "head_mode": head_mode})
    return _with_weights(model, weights, head, alignment)


def deeplabv2_resnet101_v1c(num_classes: int = 19, *, weights=None, atrous_rates=(6, 12),
                            head: str = "auto", alignment=None, bn: str = "train",
                            member: str | None = None) -> DeepLabV2:
    """The DeepLab v2 of DAFormer, HRDA and MIC: ResNet-101 V1c (mmseg's deep stem of three 3x3
    convolutions, stride on the 3x3, ``contract_dilation``), trainable BN, and their "dlv2red"
    head (``DLV2Head`` with dilations 6 and 12, two biased 3x3 convolutions summed: lhoyer/DAFormer
    ``configs/_base_/models/deeplabv2red_r50-d8.py``). ``atrous_rates=(6, 12, 18, 24)`` gives
    their full "dlv2" head.

    ``weights``: mmcv's ImageNet ``resnet101_v1c`` file (backbone only) or one of their released
    checkpoints (``member``: "student", the default and what they evaluate, or "teacher" for
    the EMA teacher); the file's preprocessing (RGB, mmseg mean/std) and, for a checkpoint,
    ``alignment="pytorch"`` (their ``align_corners=False``) come with it.
    """
    model = build_model({"backbone": "resnet", "blocks": RESNET_DEPTHS[101],
                         "num_classes": num_classes, "bn": bn, "stem": "v1c",
                         "atrous_rates": atrous_rates}, preprocessing=MMSEG_RGB)
    model.alignment = get_alignment(alignment or "pytorch")  # mmseg: align_corners=False
    if weights is not None:
        load_weights(model, weights, head=head, alignment=alignment, member=member)
    return model


def deeplabv2_vgg16(num_classes: int = 21, *, weights=None, atrous_rates=DEFAULT_RATES,
                    head: str = "auto", alignment=None) -> DeepLabV2:
    """DeepLab-ASPP-L over VGG-16: four fc6/fc7/fc8 branches, summed. ``atrous_rates=(12,)``
    gives DeepLab-LargeFOV (:func:`deeplabv2_vgg16_largefov`). ImageNet VGG-16 weights
    (torchvision layout) initialise the features and, decimated, every branch's fc6/fc7."""
    model = build_model({"backbone": "vgg16", "num_classes": num_classes,
                         "atrous_rates": atrous_rates})
    return _with_weights(model, weights, head, alignment)


def deeplabv2_vgg16_largefov(num_classes: int = 21, *, weights=None, head: str = "auto",
                             alignment=None) -> DeepLabV2:
    """DeepLab-LargeFOV: VGG-16 with one fc6 (3x3, rate 12, 1024) -> fc7 -> fc8 branch."""
    return deeplabv2_vgg16(num_classes, weights=weights, atrous_rates=LARGEFOV_RATES, head=head,
                           alignment=alignment)


#: what :func:`from_pretrained` downloads of a Hub repository: the weights and their config
#: (the card too, small, so that the snapshot is the folder as exported)
HUB_FILES = ("model.safetensors", "config.json", "README.md")


def from_pretrained(name_or_path, *, revision: str | None = None, cache_dir=None,
                    token=None, device="cpu") -> DeepLabV2:
    """The model of a model folder (``deeplabv2 export-hub``): a local folder, read by
    :func:`deeplabv2.load_model`, or a Hugging Face Hub repository ``"user/repo"`` downloaded
    (``revision``: a branch, tag or commit) into the Hugging Face cache first; with
    ``HF_HUB_OFFLINE=1`` a repository is read from that cache. The model carries the folder's
    classes, palette, preprocessing and resizing convention.

    We do not use ``huggingface_hub.PyTorchModelHubMixin``: it rebuilds a model class from the
    keyword arguments in ``config.json`` and loads the state dict itself, around our strict
    loader, the header's digest, preprocessing and alignment.
    """
    path = Path(name_or_path)
    if path.exists():  # a model folder, or any checkpoint file of ours
        return load_model(path, device=device)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(name_or_path)):
        raise ValueError(f"{name_or_path}: neither a model folder on disk nor a Hub repository "
                         "id (user/repo)")
    try:  # optional dependency, only for the Hub
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f"{name_or_path}: downloading from the Hugging Face Hub needs "
                          "huggingface_hub: pip install 'deeplabv2[hub]'") from None
    folder = snapshot_download(repo_id=str(name_or_path), revision=revision,
                               cache_dir=cache_dir, token=token,
                               allow_patterns=list(HUB_FILES))
    return load_model(folder, device=device)  # names what the repository lacks, if anything
