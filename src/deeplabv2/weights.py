"""Strict loading of weight files into :class:`DeepLabV2`, and this project's checkpoint format.

Accepted layouts (detected from the key names; ``layout=`` overrides):

=====================  ==========================================================  =========
layout                 what it is                                                  expects
=====================  ==========================================================  =========
``deeplab_caffe``      DeepLab init files converted from Caffe                     BGR 0-255
                       (``DeepLab_resnet_pretrained_imagenet.pth``,
                       ``MS_DeepLab_resnet_pretrained_COCO_init.pth``): ``Scale.``
                       prefix, head ``Scale.layer5.conv2d_list.{0-3}``
``deeplab_pytorch``    checkpoints of the common DeepLab/AdaptSegNet/ADVENT code:   BGR 0-255
                       no prefix, head ``layer6.conv2d_list.{0-3}`` (``layer5`` is
                       then the multi-level auxiliary head on layer3, dropped).
                       AdaptSegNet-trained files need ``head_mode="adaptsegnet"``
``kazuto``             kazuto1011/deeplab-pytorch (its released VOC/COCO-Stuff      BGR 0-255
                       models and caffemodel converter): ``layer1.conv1.conv``,
                       ``layerN.blockM.{reduce,conv3x3,increase,shortcut}.{conv,bn}``,
                       ``aspp.cK``; ``base.`` prefix when saved from its MSC wrapper
``torchvision_resnet`` torchvision/timm ResNet-50/101 (stride on the 3x3 conv,      RGB [0,1]
                       ``fc.*`` classifier)                                         mean/std
``torchvision_vgg``    torchvision VGG-16 (``features.*``, ``classifier.*``; fc6/  RGB [0,1]
                       fc7 decimated into every branch's fc6/fc7)
``mmcv_v1c``           mmcv's ImageNet ResNetV1c (``open-mmlab://resnet101_v1c``:   RGB 0-255
                       ``stem.{0,1,3,4,6,7}.*``, ``layerN.M.{conv,bn}K.*``,        mmseg
                       ``layerN.0.downsample.{0,1}.*``, ``fc.*``); needs a model    mean/std
                       with ``stem="v1c"``
``mmseg``              mmsegmentation segmentors and the DAFormer/HRDA/MIC UDA      RGB 0-255
                       checkpoints (``state_dict`` of ``{meta, state_dict,          mmseg
                       optimizer}``): ``[member.]backbone.*`` (ResNetV1c) and      mean/std
                       ``[member.]decode_head.aspp_modules.K.conv.*`` (DLV2Head);
                       ``member`` is ``model`` (student), ``ema_model`` (EMA
                       teacher), ``imnet_model`` (frozen ImageNet copy of the
                       feature distance), ...: one is loaded (``member=``), the
                       others are dropped and counted
``deeplabv2``          this project's ``.pth`` / ``.safetensors`` checkpoints, and  recorded
                       model folders in the Hugging Face layout (``deeplabv2
                       export-hub``: ``model.safetensors`` + ``config.json``)
=====================  ==========================================================  =========

Each file also fixes how the model resizes (:mod:`deeplabv2.model.alignment`): this project's
checkpoints record it; every other file gets ``alignment=`` (default ``"caffe"``, the paper's),
and the report names the one in force.

Every key of the file is loaded, renamed or deliberately dropped and counted in the returned
:class:`LoadReport`. A missing backbone key or a backbone shape mismatch is an error naming the
key. Files are read with ``torch.load(weights_only=True)``: a pickle that carries code is refused.
"""

from __future__ import annotations

import json
import pickle
import re
import sys
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .model import build_model
from .model.alignment import get_alignment
from .model.preprocessing import CAFFE_BGR, MMSEG_RGB, TORCHVISION_RGB, Preprocessing
from .utils.digest import DIGEST_KEY, content_digest, digest_of_checkpoint, non_finite_keys
from .utils.fileio import atomic_write

FORMAT = "deeplabv2"
FORMAT_VERSION = 2  # 2: records "alignment"; version 1 files resized with align_corners=False
_CONTAINER_KEYS = ("model", "state_dict", "model_state_dict", "net")
# DataParallel/DDP, torch.compile and kazuto1011's MSC wrappers
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base.")


class WeightsError(ValueError):
    """A weights file that cannot be loaded into the model; the message names file and key."""


@dataclass
class LoadReport:
    """What :func:`load_weights` did with every key of the file."""

    path: str
    layout: str
    loaded: dict[str, str] = field(default_factory=dict)  # file key -> model key
    dropped: dict[str, str] = field(default_factory=dict)  # file key -> reason
    not_in_file: list[str] = field(default_factory=list)  # model keys left as initialised
    head_loaded: bool = False
    preprocessing: Preprocessing | None = None
    backbone_layout: str | None = None
    alignment: str | None = None
    notes: list[str] = field(default_factory=list)  # what the user must know about this file

    @property
    def renamed(self) -> int:
        return sum(1 for k, v in self.loaded.items() if k != v)

    def summary(self) -> str:
        reasons = Counter(self.dropped.values())
        lines = [f"{self.path}: layout {self.layout}, {len(self.loaded)} tensors loaded "
                 f"({self.renamed} renamed), {len(self.dropped)} dropped"]
        lines += [f"  dropped {n}: {reason}" for reason, n in reasons.items()]
        if self.not_in_file:
            lines.append(f"  left as initialised ({len(self.not_in_file)}): "
                         + ", ".join(self.not_in_file[:4]) + (" ..." if len(self.not_in_file) > 4 else ""))
        if self.alignment:
            lines.append(f"  alignment: {self.alignment}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    __str__ = summary


# -- reading files ------------------------------------------------------------------------------
def read_file(path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return ``(state_dict, metadata)`` from a ``.pth``/``.pt`` or ``.safetensors`` file.

    ``metadata`` holds this project's checkpoint fields (``format``, ``model_config``,
    ``preprocessing``, ``layout``, ``classes``) when present, else is empty.
    """
    path = Path(path)
    if path.is_dir():  # a model folder of ``deeplabv2 export-hub`` (the Hugging Face layout)
        weights, config = model_folder_files(path)
        state, metadata = _read_safetensors(weights)
        _check_folder_config(config, metadata)
        return state, metadata
    _require_file(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _unwrap(torch_load(path), path)


# -- model folders in the Hugging Face layout ---------------------------------------------------
#: the files of a model folder (``deeplabv2 export-hub``): the weights with this project's
#: metadata in their header, and the same metadata as JSON for the Hub and for people
MODEL_FOLDER_WEIGHTS = "model.safetensors"
MODEL_FOLDER_CONFIG = "config.json"
#: the fields of ``config.json`` that repeat the weights' header and must agree with it
_FOLDER_FIELDS = ("model_config", "classes", "palette", "preprocessing", "alignment", "layout")


def is_model_folder(path) -> bool:
    """True when ``path`` is a folder holding ``model.safetensors`` and ``config.json`` (a
    model folder in the Hugging Face layout; a training run folder holds ``model.pth``)."""
    path = Path(path)
    return (path / MODEL_FOLDER_WEIGHTS).is_file() and (path / MODEL_FOLDER_CONFIG).is_file()


def model_folder_files(folder) -> tuple[Path, Path]:
    """``(weights, config)`` paths of a model folder, or a :class:`WeightsError` naming what is
    missing (and pointing a training run folder at its ``model.pth``)."""
    folder = Path(folder)
    missing = [n for n in (MODEL_FOLDER_WEIGHTS, MODEL_FOLDER_CONFIG)
               if not (folder / n).is_file()]
    if missing:
        hint = (f"; a training run folder: give {folder / 'model.pth'}"
                if (folder / "model.pth").is_file() else "")
        raise WeightsError(f"{folder}: a folder without {' and '.join(missing)}, not a model "
                           f"folder (deeplabv2 export-hub writes one){hint}")
    return folder / MODEL_FOLDER_WEIGHTS, folder / MODEL_FOLDER_CONFIG


def weights_file(path) -> Path:
    """The file that holds the weights of ``path``: ``model.safetensors`` of a model folder,
    else ``path`` itself (what a digest of "the checkpoint" reads)."""
    path = Path(path)
    return model_folder_files(path)[0] if path.is_dir() else path


def _check_folder_config(path: Path, metadata: dict) -> None:
    """``config.json`` must be this library's and repeat the weights' header: an edited copy
    would otherwise describe a model other than the one loaded."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: not readable JSON ({' '.join(str(e).split())[:160]})") \
            from None
    if not isinstance(config, dict) or config.get("library_name") != FORMAT:
        found = config.get("library_name") if isinstance(config, dict) else None
        raise WeightsError(f"{path}: not a deeplabv2 model config (library_name {found!r}, "
                           f"expected {FORMAT!r})")
    if metadata.get("format") != FORMAT:
        raise WeightsError(f"{path.parent / MODEL_FOLDER_WEIGHTS}: not a deeplabv2 checkpoint "
                           "(no deeplabv2 metadata in its header)")
    for key in _FOLDER_FIELDS:
        if key in config and config[key] != metadata.get(key):
            raise WeightsError(f"{path}: {key} {json.dumps(config[key])[:80]} differs from "
                               f"the one recorded in {MODEL_FOLDER_WEIGHTS} "
                               f"({json.dumps(metadata.get(key))[:80]}); export the folder again")


def torch_load(path) -> Any:
    """``torch.load(weights_only=True)`` on the CPU with one-line errors naming the file."""
    path = Path(path)
    _require_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise WeightsError(f"{path}: refused: the file holds pickled code or objects, not "
                               f"only tensors ({first[:160]})") from None
        raise WeightsError(f"{path}: not a readable PyTorch weights file ({first[:160]})") from None
    except Exception as e:  # RuntimeError, EOFError, BadZipFile, KeyError...: any garbage
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise WeightsError(f"{path}: truncated or corrupt weights file: damaged, or not a "
                           f"PyTorch weights file ({first[:160]})") from None


def _require_file(path: Path) -> None:
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder, not a weights file")
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")


def _verify_digest(path, recorded, actual) -> None:
    """A file this project wrote records the SHA-256 of its contents; refuse it if they differ."""
    if recorded is not None and recorded != actual:
        raise WeightsError(f"{path}: damaged: its contents do not match the SHA-256 digest "
                           "recorded when it was written (a corrupted copy or disk); use an "
                           "earlier checkpoint or copy the file again")


def _read_safetensors(path: Path):
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise WeightsError(f"{path}: truncated or corrupt safetensors file: damaged, or not "
                           f"a safetensors file ({first[:160]})") from None
    _verify_digest(path, meta.get(DIGEST_KEY), _safetensors_digest(state, meta))
    metadata = {}
    for k, v in meta.items():
        try:
            metadata[k] = json.loads(v)
        except json.JSONDecodeError:
            metadata[k] = v
    return state, metadata


def _unwrap(obj, path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(obj).__name__}")
    metadata: dict[str, Any] = {}
    if obj.get("format") == FORMAT:
        _verify_digest(path, obj.get(DIGEST_KEY), digest_of_checkpoint(obj))
        metadata = {k: v for k, v in obj.items() if k != "model" and not k.endswith("_state")}
        obj = obj["model"]
    else:
        for key in _CONTAINER_KEYS:
            if isinstance(obj.get(key), dict) and not isinstance(obj.get(key), torch.Tensor):
                if key == "state_dict" and isinstance(obj.get("meta"), dict):
                    metadata["mmcv_meta"] = obj["meta"]  # mmcv's save_checkpoint: CLASSES...
                obj = obj[key]
                break
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: entry {bad[0]!r} is a {type(obj[bad[0]]).__name__}, "
                           "not a tensor: not a state dict")
    if not obj:
        raise WeightsError(f"{path}: the file holds no tensors")
    return dict(obj), metadata


# -- detecting and converting layouts -----------------------------------------------------------
def _strip_wrappers(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        for prefix in _WRAPPER_PREFIXES:
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    """Name the layout of a (wrapper-stripped) state dict; see the module docstring."""
    keys = list(state)
    if any(k.startswith("decode_head.") or ".decode_head." in k for k in keys):
        return "mmseg"
    if any(k.startswith(("backbone.", "head.")) for k in keys):
        return "deeplabv2"
    if any(k.startswith("stem.") for k in keys):
        return "mmcv_v1c"
    if any(k.startswith("Scale.") for k in keys):
        return "deeplab_caffe"
    if any(k.startswith("features.") for k in keys):
        return "torchvision_vgg"
    if any(k.startswith("aspp.c") or _KAZUTO.match(k) for k in keys):
        return "kazuto"
    if any(k.startswith("layer1.") for k in keys):
        if any(re.match(r"layer[56]\.conv2d_list\.", k) for k in keys):
            return "deeplab_pytorch"
        return "torchvision_resnet"
    raise WeightsError(f"unrecognised weights layout (first keys: {keys[:3]})")


_HEAD = re.compile(r"^layer([56])\.conv2d_list\.(\d+)\.(weight|bias)$")
# kazuto1011: layer1 = stem (conv1 + BN), layer2..5 = our layer1..4, _ConvBnReLU = .conv/.bn
_KAZUTO = re.compile(r"^layer(\d)\.(?:conv1|block(\d+)\.(reduce|conv3x3|increase|shortcut))"
                     r"\.(conv|bn)\.(\w+)$")
_KAZUTO_BLOCK = {("reduce", "conv"): "conv1", ("reduce", "bn"): "bn1",
                 ("conv3x3", "conv"): "conv2", ("conv3x3", "bn"): "bn2",
                 ("increase", "conv"): "conv3", ("increase", "bn"): "bn3",
                 ("shortcut", "conv"): "downsample.0", ("shortcut", "bn"): "downsample.1"}


def _map_kazuto_key(key: str) -> tuple[str | None, str | None]:
    """kazuto1011/deeplab-pytorch keys (``base.`` already stripped) -> ours."""
    if key.endswith("num_batches_tracked"):
        return None, "BatchNorm step counter (not used by frozen BN)"
    m = re.match(r"^aspp\.c(\d+)\.(weight|bias)$", key)
    if m:
        return f"head.convs.{m.group(1)}.{m.group(2)}", None
    if key.startswith("fc."):
        return None, "ImageNet classifier fc.* (no counterpart in DeepLab v2)"
    m = _KAZUTO.match(key)
    if not m:
        return None, None
    layer, block, part, kind, param = m.groups()
    if block is None:  # the stem
        return (f"backbone.{'conv1' if kind == 'conv' else 'bn1'}.{param}", None) \
            if layer == "1" else (None, None)
    if not 2 <= int(layer) <= 5:
        return None, None
    return (f"backbone.layer{int(layer) - 1}.{int(block) - 1}."
            f"{_KAZUTO_BLOCK[(part, kind)]}.{param}", None)


def _map_resnet_key(key: str, layout: str, has_layer6: bool,
                    has_aux: bool = False) -> tuple[str | None, str | None]:
    """Return ``(model_key, None)`` or ``(None, reason it is dropped)`` for a ResNet file key;
    ``has_aux``: the model has the multi-level auxiliary head that ``layer5`` then loads into."""
    if layout == "deeplab_caffe" and key.startswith("Scale."):
        key = key[len("Scale."):]
    if key.endswith("num_batches_tracked"):
        return None, "BatchNorm step counter (not used by frozen BN)"
    if key.startswith("fc."):
        return None, "ImageNet classifier fc.* (no counterpart in DeepLab v2)"
    m = _HEAD.match(key)
    if m:
        level, branch, kind = m.groups()
        if level == "5" and has_layer6:
            if has_aux:
                return f"aux_head.convs.{branch}.{kind}", None
            return None, ("multi-level auxiliary head layer5 (on layer3 features; build the "
                          "model with aux_head to keep it)")
        return f"head.convs.{branch}.{kind}", None
    if key.split(".")[0] in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"):
        return "backbone." + key, None
    return None, None  # unknown: an error for the caller to raise


# -- mmcv / mmsegmentation (DAFormer, HRDA, MIC) -------------------------------------------------
#: ``member=`` name -> the attribute of the released UDA module whose weights it loads
#: (lhoyer/DAFormer ``mmseg/models/uda/uda_decorator.py``: ``self.model``, the student that
#: their ``test.py`` evaluates; ``mmseg/models/uda/dacs.py``: ``self.ema_model``, the EMA
#: teacher, and ``self.imnet_model``, the frozen ImageNet copy of the feature distance).
MMSEG_MEMBERS = {"student": "model", "teacher": "ema_model", "imnet": "imnet_model"}
_MMSEG_MEMBER_ROLE = {"model": "the student", "ema_model": "the EMA teacher",
                      "imnet_model": "the frozen ImageNet copy (feature distance)",
                      "mic.teacher.ema_model": "MIC's separate EMA teacher"}
_MMSEG_PART = re.compile(r"^(?:(.+?)\.)?(backbone|decode_head)\.(.+)$")
_MMSEG_ASPP = re.compile(r"^aspp_modules\.(\d+)\.conv\.(weight|bias)$")


def _mmseg_members(state: dict, path) -> dict[str, list[str]]:
    """The file's keys grouped by the module that holds them: ``""`` for a plain segmentor's
    ``backbone.*``/``decode_head.*``, ``"model"``, ``"ema_model"``, ... for a UDA module."""
    members: dict[str, list[str]] = {}
    for key in state:
        m = _MMSEG_PART.match(key)
        if not m:
            raise WeightsError(f"{path}: key {key!r} has no counterpart in the model (mmseg "
                               "layout: every key is [member.]backbone.* or "
                               "[member.]decode_head.*)")
        members.setdefault(m.group(1) or "", []).append(key)
    return members


def _choose_mmseg_member(members: dict, member: str | None, path) -> str:
    if list(members) == [""]:  # a plain segmentor: nothing to choose
        if member not in (None, "student"):
            raise WeightsError(f"{path}: member={member!r}, but the file is one segmentor "
                               "(backbone.*, decode_head.*) without a UDA teacher")
        return ""
    name = MMSEG_MEMBERS.get(member or "student", member)
    if name not in members:
        have = ", ".join(f"{m}.*" for m in members)
        raise WeightsError(f"{path}: member={member!r} ({name}.*) is not in the file; it holds "
                           f"{have} (member: {', '.join(MMSEG_MEMBERS)} or a prefix)")
    return name


def _map_mmseg_key(rest: str, part: str, target: dict, path,
                   key: str) -> tuple[str | None, str | None]:
    """One key of the chosen member (``part`` "backbone" or "decode_head", ``rest`` after it)."""
    if rest.endswith("num_batches_tracked"):
        dst = f"backbone.{rest}"
        return (dst, None) if part == "backbone" and dst in target else \
            (None, "BatchNorm step counter (not used: momentum 0.1; frozen BN has none)")
    if part == "backbone":
        if rest.startswith("stem.") and "backbone.stem.0.weight" not in target:
            raise WeightsError(f"{path}: key {key!r}: the file's ResNet has mmcv's V1c deep stem "
                               "(stem.0 ... stem.8): build the model with stem='v1c' "
                               "(model.stem=v1c)")
        return f"backbone.{rest}", None
    m = _MMSEG_ASPP.match(rest)
    if not m:
        raise WeightsError(f"{path}: key {key!r} has no counterpart in the model: only "
                           "DeepLab v2's DLV2Head (decode_head.aspp_modules.K.conv.*) is read "
                           "(HRDA's multi-resolution head and other decoders are not this "
                           "network)")
    return f"head.convs.{m.group(1)}.{m.group(2)}", None


def _map_mmcv_v1c_key(key: str, target: dict, path) -> tuple[str | None, str | None]:
    """mmcv's ImageNet ResNetV1c file (``open-mmlab://resnet101_v1c``) -> ours."""
    if key.startswith("fc."):
        return None, "ImageNet classifier fc.* (no counterpart in DeepLab v2)"
    if key.split(".")[0] not in ("stem", "layer1", "layer2", "layer3", "layer4"):
        return None, None
    if key.endswith("num_batches_tracked") and "backbone." + key not in target:
        return None, "BatchNorm step counter (not used: momentum 0.1; frozen BN has none)"
    if key.startswith("stem.") and "backbone.stem.0.weight" not in target:
        raise WeightsError(f"{path}: key {key!r}: the file is mmcv's ResNetV1c with the deep "
                           "stem (stem.0 ... stem.8): build the model with stem='v1c' "
                           "(model.stem=v1c)")
    return "backbone." + key, None


def _mmseg_head_branches(state: dict, prefix: str) -> int:
    found = {int(m.group(1)) for k in state if k.startswith(prefix + "decode_head.")
             for m in [_MMSEG_ASPP.match(k[len(prefix + "decode_head."):])] if m}
    return len(found)


_VGG_FC = {"classifier.0": "fc6", "classifier.3": "fc7"}
_VGG_SOURCES = ("classifier.0.weight", "classifier.0.bias", "classifier.3.weight",
                "classifier.3.bias")


def _map_vgg_key(key: str) -> tuple[str | None, str | None]:
    if key.startswith(("classifier.0.", "classifier.3.")):
        return None, None  # decimated into every branch's fc6/fc7 by _decimated_vgg_head
    if key.startswith("classifier.6."):
        return None, "ImageNet VGG fc8 (1000 classes; DeepLab's fc8 is new)"
    if key.startswith("features."):
        return "backbone." + key, None
    return None, None


def _decimated_vgg_head(state: dict, model, path) -> dict[str, torch.Tensor]:
    """torchvision VGG-16 ``classifier.0``/``classifier.3`` (fc6/fc7), decimated as DeepLab
    does, copied into every branch of the model's head: ``{model key: tensor}``."""
    need = ["classifier.0.weight", "classifier.0.bias", "classifier.3.weight",
            "classifier.3.bias"]
    missing = [k for k in need if k not in state]
    if missing:
        raise WeightsError(f"{path}: torchvision VGG-16 file without {missing[0]!r}: DeepLab "
                           "initialises fc6/fc7 from it")
    try:
        fc = decimate_vgg_classifier(*(state[k] for k in need))
    except ValueError as e:
        raise WeightsError(f"{path}: {e}") from None
    return {f"head.branches.{i}.{name}": t for i in range(len(model.head.branches))
            for name, t in fc.items()}


_PREPROCESSING = {"deeplab_caffe": CAFFE_BGR, "deeplab_pytorch": CAFFE_BGR, "kazuto": CAFFE_BGR,
                  "torchvision_resnet": TORCHVISION_RGB, "torchvision_vgg": TORCHVISION_RGB,
                  "mmcv_v1c": MMSEG_RGB, "mmseg": MMSEG_RGB}
# mmseg's ResNet style='pytorch' (stride on the 3x3 conv, max-pool without ceil_mode) is the
# torchvision layout
_BACKBONE_LAYOUT = {"deeplab_caffe": "caffe", "deeplab_pytorch": "caffe", "kazuto": "caffe",
                    "torchvision_resnet": "torchvision", "mmcv_v1c": "torchvision",
                    "mmseg": "torchvision"}


def _foreign_notes(layout: str, model, alignment: str, head_loaded: bool) -> list[str]:
    """What a user must decide about a file from other code, said in the load report."""
    notes = []
    head_mode = model.config.get("head_mode", "aspp")
    if layout == "deeplab_pytorch" and head_loaded:
        notes.append(
            f"head layer6 loaded with head_mode={head_mode!r}. AdaptSegNet-trained files and "
            "ADVENT-trained files have the same keys but not the same function: AdaptSegNet's "
            "Classifier_Module returns inside its loop and sums ASPP branches 0+1 only "
            "(branches 2-3 keep their random init), ADVENT sums all four. Build the model with "
            "head_mode='adaptsegnet' (config model.head_mode) for an AdaptSegNet file, "
            "'aspp' (default) for ADVENT")
    if layout == "mmseg" and not model.config.get("contract_dilation", False):
        notes.append("mmseg DeepLab v2 configs (DAFormer/HRDA/MIC deeplabv2_r50-d8.py) build "
                     "the ResNet with contract_dilation=True (the first block of layer3/layer4 "
                     "at dilation 1/2): this model has it off, so it computes another function "
                     "(build with contract_dilation=True, the default of stem='v1c')")
    if layout == "mmseg" and alignment != "pytorch" and head_loaded:
        notes.append("mmseg resizes the logits with align_corners=False: alignment='pytorch' "
                     "reproduces its outputs; running with " + repr(alignment) + " as asked")
    if layout == "kazuto" and alignment != "pytorch" and head_loaded:
        notes.append("kazuto1011/deeplab-pytorch trains and evaluates with "
                     "align_corners=False and floor-rounded MSC sizes: pass "
                     "alignment='pytorch' (--alignment pytorch) to reproduce a model trained "
                     "with it; 'caffe' reproduces its converted Caffe models")
    return notes


def load_weights(model, path, *, head: str = "auto", layout: str | None = None,
                 alignment=None, member: str | None = None) -> LoadReport:
    """Load ``path`` into ``model`` strictly and return a :class:`LoadReport`.

    ``head``: ``"auto"`` loads the ASPP head when the file has one of matching shape and
    otherwise leaves it initialised and says so; ``"require"`` makes a missing or mismatched
    head an error (use it to evaluate a trained checkpoint); ``"skip"`` never loads it.
    The model's backbone layout (``caffe``/``torchvision``) and preprocessing are set to the
    file's. ``alignment`` (``"caffe"``/``"pytorch"``) sets the model's resizing convention; None
    takes the one this project's checkpoints record, and for other files keeps the model's
    (``"caffe"`` unless set). Raises :class:`WeightsError` naming the file and key on any other
    mismatch.

    ``member`` chooses which network of an mmseg UDA checkpoint (DAFormer, HRDA, MIC) is
    loaded: ``"student"`` (default; ``model.*``, the one their ``test.py`` evaluates),
    ``"teacher"`` (``ema_model.*``), ``"imnet"`` (``imnet_model.*``) or another prefix of the
    file (e.g. ``"mic.teacher.ema_model"``); the other members' keys are dropped, each counted in
    the report. mmseg files get ``alignment="pytorch"`` unless ``alignment`` says otherwise
    (their logits are resized with ``align_corners=False``).
    """
    raw, metadata = read_file(path)
    return load_state(model, raw, metadata, source=path, head=head, layout=layout,
                      alignment=alignment, member=member)


def load_state(model, raw: dict[str, torch.Tensor], metadata: dict[str, Any], *, source,
               head: str = "auto", layout: str | None = None, alignment=None,
               member: str | None = None) -> LoadReport:
    """:func:`load_weights` on a state dict already read (``source`` names it in messages)."""
    if head not in ("auto", "require", "skip"):
        raise ValueError(f"head must be 'auto', 'require' or 'skip', got {head!r}")
    if getattr(model, "is_hrda", False):
        return _load_hrda(model, raw, metadata, source=source, head=head, layout=layout,
                          alignment=alignment, member=member)
    path = source
    mmcv_meta = metadata.get("mmcv_meta") or {}
    metadata = {k: v for k, v in metadata.items() if k != "mmcv_meta"}
    state = _strip_wrappers(raw)
    try:
        detected = detect_layout(state)
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from None
    layout = layout or detected
    report = LoadReport(path=str(path), layout=layout)
    kind = model.config["backbone"]
    if layout == "torchvision_vgg" and kind != "vgg16" or layout != "torchvision_vgg" and \
            layout != "deeplabv2" and kind == "vgg16":
        raise WeightsError(f"{path}: holds {layout} weights, but the model's backbone is {kind}")

    if member is not None and layout != "mmseg":
        raise WeightsError(f"{path}: member={member!r} applies to mmseg UDA checkpoints; this "
                           f"file is {layout}")
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    has_layer6 = any(k.startswith("layer6.") for k in state)
    if layout == "mmseg":
        members = _mmseg_members(state, path)
        chosen = _choose_mmseg_member(members, member, path)
        prefix = chosen + "." if chosen else ""
        if chosen:
            others = ", ".join(f"{m or '(no prefix)'}.* ({len(k)} tensors)"
                               for m, k in members.items() if m != chosen)
            report.notes.append(f"loaded {chosen}.* ({_MMSEG_MEMBER_ROLE.get(chosen, 'chosen')})"
                                + (f"; the file also holds {others}" if others else ""))
        file_branches = _mmseg_head_branches(state, prefix)
        model_branches = len(getattr(model.head, "convs", ()))
        if head != "skip" and file_branches and file_branches != model_branches:
            raise WeightsError(
                f"{path}: the file's decode_head has {file_branches} ASPP branches "
                f"(aspp_modules.0-{file_branches - 1}), the model's head {model_branches}: "
                "DAFormer/HRDA/MIC's 'dlv2red' head has 2 (dilations 6, 12): build the model "
                "with atrous_rates=[6, 12] (model.atrous_rates=[6,12]), or head='skip'")
    for key, tensor in state.items():
        if layout == "mmseg":
            m = _MMSEG_PART.match(key)
            if (m.group(1) or "") != chosen:
                other = m.group(1) or "(no prefix)"
                role = _MMSEG_MEMBER_ROLE.get(other, "another network of the file")
                report.dropped[key] = f"{other}.* ({role}), not the member loaded ({chosen}.*)"
                continue
            dst, reason = _map_mmseg_key(m.group(3), m.group(2), target, path, key)
        elif layout == "mmcv_v1c":
            dst, reason = _map_mmcv_v1c_key(key, target, path)
        elif layout == "deeplabv2":
            dst, reason = key, None
            if key.endswith("num_batches_tracked") and key not in target:
                dst, reason = None, "BatchNorm step counter (not used by frozen BN)"
        elif layout == "torchvision_vgg":
            dst, reason = _map_vgg_key(key)
            if dst is None and reason is None and key in _VGG_SOURCES:
                continue  # counted below with the decimated head
        elif layout == "kazuto":
            dst, reason = _map_kazuto_key(key)
        else:
            dst, reason = _map_resnet_key(key, layout, has_layer6,
                                          getattr(model, "aux_head", None) is not None)
        if reason is not None:
            report.dropped[key] = reason
            continue
        if dst is None or dst not in target:
            raise WeightsError(f"{path}: key {key!r} has no counterpart in the model "
                               f"({layout} layout into a DeepLab v2 {kind} model)")
        mapped[dst] = tensor
        report.loaded[key] = dst

    if layout == "torchvision_vgg":  # fc6/fc7 of every branch: pretrained, not the classifier
        fc = _decimated_vgg_head(state, model, path)
        mapped.update(fc)
        for src in _VGG_SOURCES:
            report.loaded[src] = "head.branches.*." + _VGG_FC[src.rsplit(".", 1)[0]] + \
                "." + src.rsplit(".", 1)[1] + " (decimated)"
    head_keys = [k for k in target if k.startswith("head.")]
    file_head = {k for k in mapped if k.startswith("head.")}
    if layout == "torchvision_vgg":  # the classifier proper (fc8) is never in the file
        head_keys = [k for k in head_keys if ".fc8." in k]
        file_head = {k for k in file_head if ".fc8." in k}
    head_ok = bool(file_head) and all(k in mapped and mapped[k].shape == target[k].shape
                                      for k in head_keys)
    if head == "require" and not head_ok:
        missing = [k for k in head_keys if k not in mapped]
        why = (f"has no head key {missing[0]!r}" if missing else
               "has a head of another shape: " + ", ".join(
                   f"{k} {tuple(mapped[k].shape)} vs {tuple(target[k].shape)}"
                   for k in head_keys if mapped[k].shape != target[k].shape)[:200])
        raise WeightsError(f"{path}: {why}")
    if file_head and (head == "skip" or not head_ok):
        reason = ("head not requested (head='skip')" if head == "skip" else
                  "head of another shape than the model's (e.g. other number of classes); "
                  "the model's head stays initialised")
        for src, dst in list(report.loaded.items()):
            if dst.startswith(("head.", "aux_head.")):
                report.dropped[src] = reason
                del report.loaded[src]
                del mapped[dst]
    report.head_loaded = any(k in mapped for k in head_keys)

    for key, t in target.items():
        if key in mapped:
            if mapped[key].shape != t.shape:
                src = next(s for s, d in report.loaded.items() if d == key)
                raise WeightsError(f"{path}: shape mismatch for {src!r}: file "
                                   f"{tuple(mapped[key].shape)}, model {tuple(t.shape)}")
        elif key.startswith(("head.", "aux_head.")) or key.endswith("num_batches_tracked"):
            report.not_in_file.append(key)
        else:
            hint = ""
            if key.startswith("backbone.stem."):
                hint = ("; the model has mmcv's V1c deep stem, the file the 7x7 conv1: build it "
                        "with stem='caffe'")
            raise WeightsError(f"{path}: missing backbone key {key!r} (the file's {layout} "
                               f"weights do not fit this {_describe(model)}{hint})")

    # Follow the weights' layout, preprocessing and resizing convention before copying.
    if layout == "deeplabv2":
        backbone_layout = metadata.get("layout", "caffe")
        pre = metadata.get("preprocessing")
        report.preprocessing = Preprocessing.from_dict(pre) if pre else model.preprocessing
        # version 1 files (no field) were trained with align_corners=False resizing
        recorded = metadata.get("alignment", "pytorch" if metadata else None)
        align = get_alignment(alignment or recorded or getattr(model, "alignment", None))
        if recorded and align.name != recorded:
            report.notes.append(f"the file records alignment {recorded!r}; "
                                f"running with {align.name!r} as asked")
    else:
        backbone_layout = _BACKBONE_LAYOUT.get(layout)
        report.preprocessing = _PREPROCESSING[layout]
        default = "pytorch" if layout == "mmseg" and report.head_loaded else None
        align = get_alignment(alignment or default or getattr(model, "alignment", None))
        report.notes += _foreign_notes(layout, model, align.name, report.head_loaded)
    report.alignment = align.name
    model.alignment = align
    if layout == "mmseg" and report.head_loaded:
        _classes_from_meta(model, mmcv_meta, report)
    elif layout == "deeplabv2" and report.head_loaded:  # ours: the classes it was trained on
        _classes_from_meta(model, {"CLASSES": metadata.get("classes"),
                                   "PALETTE": metadata.get("palette")}, report)
    if backbone_layout and hasattr(model.backbone, "set_layout"):
        model.backbone.set_layout(backbone_layout)
    report.backbone_layout = backbone_layout
    model.preprocessing = report.preprocessing
    with torch.no_grad():
        for key, tensor in mapped.items():
            target[key].copy_(tensor)
    assert len(report.loaded) + len(report.dropped) == len(state)
    model.load_report = report
    return report


#: a released HRDA checkpoint's two heads (lhoyer/HRDA decode_heads/hrda_head.py: ``HRDAHead``
#: builds its single-scale head as ``self.head`` and the attention as ``self.scale_attention``)
_HRDA_HEADS = re.compile(r"^(?:(.+?)\.)?decode_head\.(head|scale_attention)\.(.+)$")


def _released_hrda(state: dict, member: str | None, path):
    """A released HRDA (mmseg) state dict -> ``(network state, attention state, renamed,
    dropped)``: ``[m.]decode_head.head.*`` renamed to ``[m.]decode_head.*`` for the network's
    mmseg loader (which chooses the member and checks the rest), the chosen member's
    ``decode_head.scale_attention.aspp_modules.K.conv.*`` as ``convs.K.*`` of the attention
    head; ``renamed`` maps the network keys back to the file's, ``dropped`` the other members'
    attention keys with the reason."""
    net, renamed, attention = {}, {}, {}
    for key, tensor in state.items():
        m = _HRDA_HEADS.match(key)
        if m is None:
            net[key] = tensor
        elif m.group(2) == "head":
            new = (m.group(1) + "." if m.group(1) else "") + "decode_head." + m.group(3)
            net[new], renamed[new] = tensor, key
        else:
            attention.setdefault(m.group(1) or "", {})[m.group(3)] = (key, tensor)
    chosen = _choose_mmseg_member(_mmseg_members(net, path), member, path)
    att, dropped = {}, {}
    for owner, keys in attention.items():
        for rest, (key, tensor) in keys.items():
            if owner != chosen:
                role = _MMSEG_MEMBER_ROLE.get(owner, "another network of the file")
                dropped[key] = f"{owner}.* ({role}), not the member loaded ({chosen}.*)"
                continue
            a = _MMSEG_ASPP.match(rest)
            if a is None:
                raise WeightsError(f"{path}: key {key!r} has no counterpart in the model: the "
                                   "HRDA attention head is read as DLV2Head's "
                                   "aspp_modules.K.conv.* only")
            att[f"convs.{a.group(1)}.{a.group(2)}"] = (key, tensor)
    return net, att, renamed, dropped


def _load_hrda(model, raw, metadata, *, source, head, layout, alignment, member) -> LoadReport:
    """An HRDA wrapper (:class:`~deeplabv2.model.hrda.HRDA`) from one of this project's files
    saved from a wrapper: ``network.*`` into the network (by :func:`load_state`, with every
    check and fact of a plain model), ``scale_attention.*`` strictly into the attention head
    (a head: loaded unless ``head='skip'``, required with ``'require'``); or from a released
    HRDA checkpoint (mmseg layout, :func:`_released_hrda`: ``[member.]backbone.*``,
    ``[member.]decode_head.head.aspp_modules.K.conv.*`` and
    ``[member.]decode_head.scale_attention.aspp_modules.K.conv.*``, ``member`` as for
    :func:`load_weights`). Another file goes into ``model.network`` (e.g. an ImageNet init
    file before wrapping)."""
    state = _strip_wrappers(raw)
    if any(_HRDA_HEADS.match(k) for k in state):
        net, att_named, renamed, dropped = _released_hrda(state, member, source)
        report = load_state(model.network, net, metadata, source=source, head=head,
                            layout=layout or "mmseg", alignment=alignment, member=member)
        report.loaded = {renamed.get(k, k): v for k, v in report.loaded.items()}
        report.dropped = {renamed.get(k, k): v for k, v in report.dropped.items()}
        report.dropped.update(dropped)
        return _load_attention(model, {k: t for k, (_, t) in att_named.items()}, report,
                               source, head, names={k: n for k, (n, _) in att_named.items()})
    net = {k[len("network."):]: v for k, v in state.items() if k.startswith("network.")}
    att = {k[len("scale_attention."):]: v for k, v in state.items()
           if k.startswith("scale_attention.")}
    other = [k for k in state if not k.startswith(("network.", "scale_attention."))]
    if other or not net:
        raise WeightsError(f"{source}: not a file saved from an HRDA model (e.g. key "
                           f"{(other or list(state) or ['(none)'])[0]!r}; expected network.* "
                           "and scale_attention.*, or a released HRDA checkpoint's "
                           "decode_head.head.* and decode_head.scale_attention.*): load it "
                           "into model.network, the wrapped DeepLab v2")
    report = load_state(model.network, net, metadata, source=source, head=head, layout=layout,
                        alignment=alignment, member=member)
    return _load_attention(model, att, report, source, head)


def _load_attention(model, att: dict, report: LoadReport, source, head: str,
                    names: dict | None = None) -> LoadReport:
    """``att`` (keys of ``model.scale_attention``) strictly into the HRDA attention head;
    ``names``: the file's key of each (default ``scale_attention.KEY``), for the report."""
    names = names or {k: f"scale_attention.{k}" for k in att}
    if head == "require" and not att:
        raise WeightsError(f"{source}: has no scale_attention.* (the HRDA attention head)")
    if att and head != "skip":
        target = model.scale_attention.state_dict()
        missing = sorted(set(target) - set(att))
        extra = sorted(set(att) - set(target))
        bad = [k for k in target if k in att and att[k].shape != target[k].shape]
        if missing or extra or bad:
            what = (f"missing scale_attention.{missing[0]}" if missing else
                    f"unexpected scale_attention.{extra[0]}" if extra else
                    f"shape mismatch for scale_attention.{bad[0]}: file "
                    f"{tuple(att[bad[0]].shape)}, model {tuple(target[bad[0]].shape)}")
            raise WeightsError(f"{source}: {what}")
        with torch.no_grad():
            for k, v in att.items():
                target[k].copy_(v)
        report.loaded.update({names[k]: f"scale_attention.{k}" for k in att})
    else:
        report.dropped.update({names[k]: "head not requested (head='skip')" for k in att})
    model.load_report = report
    return report


def _classes_from_meta(model, meta: dict, report: LoadReport) -> None:
    """Class names and colours of an mmseg checkpoint (``meta['CLASSES']``/``['PALETTE']``,
    written by mmseg's ``train.py``; ours: the header's ``classes``/``palette``) onto
    ``model.classes``/``model.palette`` when they count the model's classes, so that a model
    built by a :mod:`deeplabv2.hub` builder and loaded carries them as :func:`load_model`'s
    does, and ``save_weights(model, path, model.classes, model.palette)`` keeps them."""
    classes, palette = meta.get("CLASSES"), meta.get("PALETTE")
    n = model.num_classes
    if isinstance(classes, (list, tuple)) and len(classes) == n and \
            all(isinstance(c, str) for c in classes):
        model.classes = list(classes)
        report.notes.append(f"classes from the file's meta: {', '.join(classes[:4])}"
                            + (" ..." if n > 4 else ""))
    if isinstance(palette, (list, tuple)) and len(palette) == n and \
            all(isinstance(c, (list, tuple)) and len(c) == 3 for c in palette):
        model.palette = [[int(v) for v in c] for c in palette]


def _describe(model) -> str:
    c = model.config
    if c["backbone"] == "resnet":
        stem = " and the v1c stem" if c.get("stem") == "v1c" else ""
        return f"ResNet with blocks {tuple(c['blocks'])} and width {c['width']}{stem}"
    return "VGG-16"


# -- writing this project's checkpoints ---------------------------------------------------------
def checkpoint_metadata(model, classes=None, palette=None, provenance=None,
                        backbone_only: bool = False) -> dict[str, Any]:
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "model_config": dict(model.config),
            "layout": model.layout, "preprocessing": model.preprocessing.to_dict(),
            "alignment": get_alignment(getattr(model, "alignment", None)).name,
            "classes": list(classes) if classes is not None else None,
            "palette": [[int(c) for c in rgb] for rgb in palette] if palette is not None
            else None}
    if provenance is not None:  # where converted weights came from (deeplabv2.caffe)
        meta["provenance"] = dict(provenance)
    if backbone_only:
        meta["backbone_only"] = True
    return meta


def save_weights(model, path, classes=None, palette=None, *, provenance=None,
                 backbone_only: bool = False, **extra) -> None:
    """Save ``model`` as this project's ``.pth`` (default) or ``.safetensors`` checkpoint.

    The file records the architecture config, backbone layout, preprocessing, class names and
    their colours, so
    :func:`load_model` rebuilds the model from it alone. ``provenance`` (a plain dict: source
    file, its SHA-256, ...) is recorded in both formats; ``backbone_only`` leaves the head out
    (an init file's weights: loadable with ``head="auto"``, refused by :func:`load_model`).
    ``extra`` (``.pth`` only) adds plain fields such as training state.
    """
    meta = checkpoint_metadata(model, classes, palette, provenance, backbone_only)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if not (backbone_only and k.startswith(("head.", "aux_head.")))}
    bad = non_finite_keys(state)
    if bad:  # a NaN checkpoint would pass for a good one later: never write it
        raise WeightsError(f"{path}: not written: the weights hold NaN/inf ({bad[0]}"
                           f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''})")
    if str(path).endswith(".safetensors"):
        if extra:
            raise ValueError("extra fields are only stored in .pth checkpoints")
        header = {k: json.dumps(v) for k, v in meta.items()}
        header[DIGEST_KEY] = _safetensors_digest(state, header)
        atomic_write(path, lambda tmp: _write_safetensors(tmp, state, header))
    else:
        obj = {**meta, "model": state, **extra}
        obj[DIGEST_KEY] = digest_of_checkpoint(obj)
        atomic_write(path, lambda tmp: _write_pth(tmp, obj))


# The same contents give the same bytes, whatever the file's (temporary) name and the process:
# a digest of the file identifies the weights.
def _write_pth(path, obj: dict) -> None:
    """``torch.save`` of :func:`_canonical` ``obj`` into an open file: given a name, it would
    store that name (the random temporary one) as the archive's root folder inside the
    file."""
    with open(path, "wb") as f:
        torch.save(_canonical(obj), f)


def _canonical(obj):
    """``obj`` with every string interned and its containers rebuilt (none shared), tensors
    as they are. pickle writes an object it has written before as a reference to it, chosen by
    identity: a resumed run's optimizer names its parameter groups with the strings read from
    ``last.pth``, an uninterrupted run's with the code's own, which the config saved before
    them holds too; without this their checkpoints differ in bytes, not in contents."""
    if isinstance(obj, str):
        return sys.intern(obj)
    if type(obj) in (dict, OrderedDict):
        out = type(obj)((_canonical(k), _canonical(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a module state_dict's versions, read by its loader
            out._metadata = _canonical(obj._metadata)
        return out
    if type(obj) in (list, tuple):
        return type(obj)(_canonical(v) for v in obj)
    return obj


def _write_safetensors(path, state: dict, header: dict) -> None:
    """The ``.safetensors`` file of ``state`` with the metadata ``header`` in sorted order
    (safetensors writes it in the order of a hash map, which changes from process to
    process)."""
    from safetensors.torch import save  # imported only for .safetensors files (start-up time)
    data = save(state, metadata=header)
    n = int.from_bytes(data[:8], "little")
    head = json.loads(data[8:8 + n])
    head["__metadata__"] = dict(sorted(head["__metadata__"].items()))
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # not expected (the same JSON, reordered): keep safetensors' own header
        text = data[8:8 + n]
    with open(path, "wb") as f:
        f.write(data[:8])
        f.write(text + b" " * (n - len(text)))  # the header's padding, as safetensors pads it
        f.write(memoryview(data)[8 + n:])


def _safetensors_digest(state: dict, header: dict) -> str:
    """Digest of a ``.safetensors`` file's tensors and metadata (key order does not matter)."""
    return content_digest({"tensors": {k: state[k] for k in sorted(state)},
                           "metadata": {k: header[k] for k in sorted(header) if k != DIGEST_KEY}})


def load_model(path, *, device="cpu"):
    """Rebuild a model from one of this project's checkpoints (``.pth``, ``.safetensors``, or a
    model folder of ``deeplabv2 export-hub``: ``model.safetensors`` + ``config.json``) and load
    it (head required).

    The returned model also carries the checkpoint's ``classes`` and ``palette`` (or None).
    """
    state, metadata = read_file(path)
    if metadata.get("format") != FORMAT or "model_config" not in metadata:
        raise WeightsError(f"{path}: not a deeplabv2 checkpoint (no model_config recorded); "
                           "build the model and call load_weights instead")
    if metadata.get("backbone_only"):
        raise WeightsError(f"{path}: a backbone-only checkpoint (converted from "
                           f"{(metadata.get('provenance') or {}).get('source', 'an init file')}"
                           ", which has no DeepLab v2 head): train from it "
                           "(model.weights=...), it has no classifier to run")
    model = build_model(metadata["model_config"])
    load_state(model, state, metadata, source=path, head="require")
    model.classes = metadata.get("classes")
    model.palette = metadata.get("palette")
    return model.to(device)


def decimate_vgg_classifier(fc6_weight: torch.Tensor, fc6_bias: torch.Tensor,
                            fc7_weight: torch.Tensor, fc7_bias: torch.Tensor,
                            channels: int = 1024) -> dict[str, torch.Tensor]:
    """ImageNet VGG-16's fc6 ``(4096, 25088)`` and fc7 ``(4096, 4096)`` -> DeepLab's fc6
    ``(1024, 512, 3, 3)`` and fc7 ``(1024, 1024, 1, 1)`` by decimation: every 4th filter
    (and, for fc7, every 4th input) and, of fc6's 7x7 taps, rows and columns 0, 3, 6.

    Returns ``{"fc6.weight", "fc6.bias", "fc7.weight", "fc7.bias"}``.
    """
    out = fc6_weight.shape[0]
    if fc6_weight.shape != (out, 512 * 7 * 7) or fc7_weight.shape != (out, out) or \
            out % channels:
        raise ValueError(f"expected VGG-16 fc6 ({out}, 25088) and fc7 ({out}, {out}) with "
                         f"{out} divisible by {channels}, got {tuple(fc6_weight.shape)} and "
                         f"{tuple(fc7_weight.shape)}")
    step = out // channels
    taps = torch.tensor([0, 3, 6])
    fc6 = fc6_weight.reshape(out, 512, 7, 7)[::step][:, :, taps][:, :, :, taps]
    return {"fc6.weight": fc6.contiguous(), "fc6.bias": fc6_bias[::step].clone(),
            "fc7.weight": fc7_weight[::step, ::step].reshape(channels, channels, 1, 1).clone(),
            "fc7.bias": fc7_bias[::step].clone()}
