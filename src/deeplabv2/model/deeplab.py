"""DeepLab v2: atrous backbone + ASPP head + bilinear upsampling (Chen et al., TPAMI 2018)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .preprocessing import CAFFE_BGR, Preprocessing
from .alignment import CAFFE, Alignment, get_alignment
from .aspp import ASPP
from .resnet import BN_MODES, STEMS, ResNet
from .vgg import VGG16, VGGASPP

RESNET_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
DEFAULT_RATES = (6, 12, 18, 24)
LARGEFOV_RATES = (12,)


class DeepLabV2(nn.Module):
    """Backbone -> ASPP -> bilinear upsampling.

    ``model(x)`` returns ``(N, C, H, W)`` logits at the input size, in train and eval mode
    alike, upsampled bilinearly as :attr:`alignment` says (default ``"caffe"``: score cell
    ``i`` on pixel ``8 i``, as the paper's ``Interp`` layer); ``model.logits(x)`` returns the
    stride-8 ``(N, C, h, w)`` scores the paper's loss uses. ``x`` is the preprocessed input
    (see :attr:`preprocessing`); ``model.preprocess(rgb_uint8)`` produces it.

    ``config`` is the plain dict that :func:`build_model` rebuilds the architecture from; it is
    saved in this project's checkpoints next to the preprocessing, the alignment convention
    and the backbone layout.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, config: dict[str, Any],
                 preprocessing: Preprocessing = CAFFE_BGR, alignment: Alignment = CAFFE,
                 aux_head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head  # multi-level: an ASPP on layer3 (AdaptSegNet/ADVENT), or None
        self.config = dict(config)
        self.preprocessing = preprocessing
        self.alignment = get_alignment(alignment)
        self.output_stride = 8
        self.load_report = None  # set by load_weights

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    @property
    def layout(self) -> str:
        return getattr(self.backbone, "layout", "caffe")

    def preprocess(self, images) -> torch.Tensor:
        """RGB ``uint8`` ``(H, W, 3)``/``(N, H, W, 3)`` -> this model's ``(N, 3, H, W)`` input."""
        return self.preprocessing(images)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Stride-8 class scores ``(N, C, H // 8 + 1, W // 8 + 1)`` (512x1024: 65x129; 321: 41),
        cell ``i`` centred on pixel ``8 i``."""
        return self.head(self.backbone(x))

    def forward(self, x: torch.Tensor, upsample: bool = True, aux: bool = False):
        """Logits upsampled to the input size, or the stride-8 scores with ``upsample=False``
        (the form a DDP-wrapped model is called in for the paper's stride-8 loss). ``aux=True``
        (a model built with ``aux_head``) returns ``(main, auxiliary)`` scores, both stride 8
        or both upsampled: the multi-level outputs of AdaptSegNet/ADVENT."""
        if aux:
            if self.aux_head is None:
                raise ValueError("aux=True needs a model built with aux_head (model.aux_head)")
            x3, x4 = self.backbone.features(x)
            outs = (self.head(x4), self.aux_head(x3))
            if upsample:
                outs = tuple(self.alignment.upsample(o, x.shape[-2:], self.output_stride)
                             for o in outs)
            return outs
        logits = self.logits(x)
        if not upsample:
            return logits
        return self.alignment.upsample(logits, x.shape[-2:], self.output_stride)

    # -- optimisation ------------------------------------------------------------------------
    def param_groups(self, lr: float, weight_decay: float = 5e-4,
                     style: str = "deeplab") -> list[dict]:
        """Parameter groups; ``style="mmseg"``: :meth:`mmseg_param_groups`. ``"deeplab"``: SGD
        parameter groups by module ownership (cf. the Caffe solver's lr_mult/decay_mult).

        * ``backbone``: pretrained weights at 1x lr with weight decay (the backbone, and VGG's
          fc6/fc7, which DeepLab initialises from ImageNet);
        * ``backbone_bias``: their biases (VGG) at 2x lr, no decay;
        * ``backbone_norm``: BN scale/shift, only when BN is trainable: 1x lr, no decay;
        * ``head``: the new classifier's weights (ASPP; VGG's fc8) at 10x lr with weight decay;
        * ``head_bias``: its biases at 20x lr, no decay.

        Every trainable parameter is in exactly one group; frozen ones are in none. Each group
        carries ``lr_mult`` so that a schedule can set ``group["lr"] = lr_mult * base_lr``.
        """
        if style == "mmseg":
            return self.mmseg_param_groups(lr, weight_decay)
        if style != "deeplab":
            raise ValueError(f"param_groups style={style!r}; valid: deeplab, mmseg")
        norm_types = (nn.BatchNorm2d, nn.GroupNorm, nn.SyncBatchNorm)
        norm_params = {id(p) for m in self.backbone.modules() if isinstance(m, norm_types)
                       for p in m.parameters(recurse=False)}
        classifier = {id(p) for p in self.head.classifier_parameters()}
        if self.aux_head is not None:
            classifier |= {id(p) for p in self.aux_head.parameters()}
        buckets: dict[str, list[nn.Parameter]] = {k: [] for k in
                                                  ("backbone", "backbone_bias", "backbone_norm",
                                                   "head", "head_bias")}
        for p in self.backbone.parameters():
            if not p.requires_grad:
                continue
            key = "backbone_norm" if id(p) in norm_params else (
                "backbone" if p.ndim > 1 else "backbone_bias")
            buckets[key].append(p)
        heads = [*self.head.parameters(),
                 *(self.aux_head.parameters() if self.aux_head is not None else ())]
        for p in heads:
            if p.requires_grad:
                prefix = "head" if id(p) in classifier else "backbone"
                buckets[prefix if p.ndim > 1 else prefix + "_bias"].append(p)
        settings = {"backbone": (1.0, weight_decay), "backbone_bias": (2.0, 0.0),
                    "backbone_norm": (1.0, 0.0), "head": (10.0, weight_decay),
                    "head_bias": (20.0, 0.0)}
        groups = []
        for name, params in buckets.items():
            if params:
                mult, wd = settings[name]
                groups.append({"name": name, "params": params, "lr": lr * mult,
                               "lr_mult": mult, "weight_decay": wd})
        return groups

    def mmseg_param_groups(self, lr: float, weight_decay: float, head_mult: float = 10.0
                           ) -> list[dict]:
        """DAFormer's groups (experiments.py: ``paramwise_cfg=dict(custom_keys={'head':
        dict(lr_mult=10.)})``, built by mmcv's ``DefaultOptimizerConstructor``): a parameter
        whose name contains ``head`` (the decode head, here ``head.`` and ``aux_head.``) gets
        ``head_mult`` x lr, every other 1x; every parameter, biases and norms included, is
        decayed by ``weight_decay`` (no ``decay_mult``, ``bias_decay_mult`` or
        ``norm_decay_mult`` is set for their ResNet runs). Frozen parameters are left out (mmcv
        puts them in a group, where they never get a gradient)."""
        backbone, head = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (head if "head" in name else backbone).append(p)
        groups = []
        for name, params, mult in (("backbone", backbone, 1.0), ("head", head, head_mult)):
            if params:
                groups.append({"name": name, "params": params, "lr": lr * mult,
                               "lr_mult": mult, "weight_decay": weight_decay})
        return groups


def build_model(config: dict[str, Any], preprocessing: Preprocessing | None = None) -> DeepLabV2:
    """Build the architecture described by ``config`` (the dict stored as ``model.config``).

    A config with an ``hrda`` mapping (``detail_crop``, ``context_scale``, ``divisible``)
    builds the network of the other keys wrapped in :class:`~deeplabv2.model.hrda.HRDA`.

    Keys: ``backbone`` ("resnet" or "vgg16"), ``num_classes``, ``atrous_rates`` (VGG-16 with
    ``[12]``: DeepLab-LargeFOV), and for a ResNet ``blocks`` (blocks per stage), ``width`` (stem
    channels, 64 for the real network), ``bn`` (one of
    :data:`deeplabv2.model.resnet.BN_MODES`: "frozen", "batch", "train"; the older key
    ``frozen_bn``: true is "frozen", false "train"), ``layout`` ("caffe" or "torchvision")
    and ``head_mode`` ("aspp", or "adaptsegnet" for AdaptSegNet-trained files: see
    :data:`deeplabv2.model.aspp.HEAD_MODES`), ``aux_head`` (True: the multi-level auxiliary
    ASPP on layer3 of AdaptSegNet/ADVENT, same rates and head mode), ``stem`` ("caffe", the
    default: the 7x7 DeepLab stem; "v1c": mmseg's ResNetV1c deep stem, see
    :mod:`deeplabv2.model.resnet`) and ``contract_dilation`` (the first block of layer3/layer4
    at half dilation, as mmseg's ``ResLayer``; default: true with the v1c stem, false
    otherwise). With ``stem: v1c`` the layout defaults to "torchvision" (mmseg's
    ``style='pytorch'``: the stride on the 3x3 convolution, max-pool without ``ceil_mode``).

    The DeepLab v2 of DAFormer/HRDA/MIC ("dlv2red" with ResNet-101 V1c) is
    ``{"stem": "v1c", "bn": "train", "atrous_rates": [6, 12]}``: their ``DLV2Head`` with
    ``dilations=(6, 12)`` has exactly two 3x3 convolutions with bias, summed, which is this
    ASPP with two rates (``head_mode`` "aspp"), not the four-branch "adaptsegnet" head whose
    branches 2-3 are kept in the state dict.

    Keys at their default (``stem`` caffe, ``contract_dilation`` false, ``head_mode`` aspp) are
    not written into the returned config, so the configs of older checkpoints stay as they were.
    """
    cfg = dict(config)
    if "hrda" in cfg:  # HRDA's wrapper around the network (deeplabv2.model.hrda)
        hrda = cfg.pop("hrda")
        if not isinstance(hrda, dict):
            raise ValueError(f"model config hrda must be a mapping, got {hrda!r}")
        unknown = set(hrda) - {"detail_crop", "context_scale", "divisible"}
        if unknown:
            raise ValueError(f"unknown model config hrda keys {sorted(unknown)}; valid: "
                             "context_scale, detail_crop, divisible")
        from .hrda import HRDA
        return HRDA(build_model(cfg, preprocessing), **hrda)
    known = {"backbone", "num_classes", "atrous_rates", "blocks", "width", "frozen_bn", "bn",
             "layout", "head_mode", "aux_head", "stem", "contract_dilation"}
    unknown = set(cfg) - known
    if unknown:
        raise ValueError(f"unknown model config keys {sorted(unknown)}; valid: {sorted(known)}")
    num_classes = int(cfg["num_classes"])
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    rates = tuple(int(r) for r in cfg.get("atrous_rates", DEFAULT_RATES))
    cfg["atrous_rates"] = list(rates)
    kind = cfg.get("backbone", "resnet")
    aux = None
    if kind == "resnet":
        blocks = tuple(int(b) for b in cfg.get("blocks", RESNET_DEPTHS[101]))
        width = int(cfg.get("width", 64))
        bn = bn_mode(cfg)
        stem = cfg.pop("stem", None) or "caffe"
        if stem not in STEMS:
            raise ValueError(f"model config stem={stem!r}; valid values: {', '.join(STEMS)}")
        contract = cfg.pop("contract_dilation", None)
        if contract is None:
            contract = stem == "v1c"
        if contract not in (True, False):
            raise ValueError(f"model config contract_dilation={contract!r} must be true or false")
        layout = cfg.get("layout") or ("torchvision" if stem == "v1c" else "caffe")
        head_mode = cfg.get("head_mode", "aspp")
        # Recorded as the files written before "batch" existed record it (frozen_bn, same key
        # order), so that their configs and bytes stay what they were; "batch" as bn (which an
        # older version refuses instead of building another network).
        if bn == "batch":
            cfg.pop("frozen_bn", None)
            cfg.update(blocks=list(blocks), width=width, bn=bn, layout=layout)
        else:
            cfg.pop("bn", None)
            cfg.update(blocks=list(blocks), width=width, frozen_bn=bn == "frozen", layout=layout)
        if head_mode != "aspp":
            cfg["head_mode"] = head_mode
        if stem != "caffe":
            cfg["stem"] = stem
        if contract:
            cfg["contract_dilation"] = True
        elif stem != "caffe":
            cfg["contract_dilation"] = False  # not this stem's default: say so
        backbone = ResNet(blocks, layout=layout, width=width, bn=bn, stem=stem,
                          contract_dilation=contract)
        head = ASPP(backbone.out_channels, num_classes, rates, head_mode=head_mode)
        if cfg.get("aux_head"):
            cfg["aux_head"] = True
            aux = ASPP(backbone.out_channels // 2, num_classes, rates, head_mode=head_mode)
        else:
            cfg.pop("aux_head", None)
    elif kind == "vgg16":
        for k in ("blocks", "width", "frozen_bn", "bn", "layout", "head_mode", "aux_head", "stem",
                  "contract_dilation"):
            if k in cfg:
                raise ValueError(f"model config key {k!r} does not apply to the vgg16 backbone")
        backbone = VGG16()
        head = VGGASPP(backbone.out_channels, num_classes, rates)
    else:
        raise ValueError(f"unknown backbone {kind!r}; expected 'resnet' or 'vgg16'")
    cfg["backbone"] = kind
    cfg.pop("layout", None)  # the layout follows the weights: read it from model.layout
    return DeepLabV2(backbone, head, cfg, preprocessing or CAFFE_BGR, aux_head=aux)


def bn_mode(config: dict[str, Any]) -> str:
    """The BN mode (:data:`~deeplabv2.model.resnet.BN_MODES`) of a ResNet model config: its
    ``bn``, or the older ``frozen_bn`` (true: "frozen", false: "train"; checkpoints written
    before ``bn`` existed), "frozen" when neither is given. Both given and disagreeing is an
    error naming the two keys."""
    bn, frozen = config.get("bn"), config.get("frozen_bn")
    if bn is not None and bn not in BN_MODES:
        raise ValueError(f"model config bn={bn!r}; valid values: {', '.join(BN_MODES)}")
    if frozen is not None and frozen not in (True, False):
        raise ValueError(f"model config frozen_bn={frozen!r} must be true or false")
    implied = None if frozen is None else ("frozen" if frozen else "train")
    if bn is not None and implied is not None and bn != implied:
        raise ValueError(f"model config bn={bn!r} contradicts frozen_bn={frozen!r} (frozen_bn "
                         "true is bn 'frozen', false is bn 'train'): give only bn")
    return bn or implied or "frozen"


#: what callers read from a :class:`deeplabv2.model.DeepLabV2` besides calling it
NETWORK_FACTS = ("config", "preprocessing", "alignment", "output_stride", "classes", "palette")


def copy_network_facts(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` (a wrapper that runs ``source``'s function) the :data:`NETWORK_FACTS`
    ``source`` has."""
    for name in NETWORK_FACTS:
        if hasattr(source, name):
            setattr(target, name, getattr(source, name))


class NetworkWrapper(nn.Module):
    """Base of the modules that run a network's function in another form: test-time and
    training MSC (:class:`deeplabv2.model.MSC`), an optimized copy
    (:class:`deeplabv2.deploy.fast.InferenceModel`), another runtime (OpenVINO, ONNX Runtime),
    an ensemble of networks.

    Each answers for the network it was made from, ``source``, in one way: the
    :data:`NETWORK_FACTS` ``source`` has, copied at construction (the alignment convention is
    the default one where ``source`` names none), ``num_classes`` from the config and
    ``preprocess`` by the preprocessing. ``source`` itself is not kept.
    """

    def __init__(self, source: nn.Module):
        super().__init__()
        copy_network_facts(source, self)
        self.alignment = get_alignment(getattr(source, "alignment", None))

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    def preprocess(self, images) -> torch.Tensor:
        """RGB ``uint8`` ``(H, W, 3)``/``(N, H, W, 3)`` -> the ``float32`` ``(N, 3, H, W)``
        input of the source network."""
        return self.preprocessing(images)
