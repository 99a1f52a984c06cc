"""Experiment configuration: one complete YAML per experiment, overridable by ``key=value``.

A config has four sections, each a dataclass whose fields are the valid keys: ``model``,
``data``, ``train``, ``eval``. A key that is not a field is an error listing the valid ones, so
a typo never silently falls back to a default. ``-c NAME`` finds ``NAME.yaml`` among the
packaged configs (``deeplabv2/configs``); a path is read as is.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .adapt.methods import METHODS
from .adapt.mic import block_grid, mic_settings
from .data.transforms import RESIZE_FILTERS
from .inference.crf import DenseCRF, crf_preset
from .inference.front import InferenceConfig
from .model.resnet import BN_MODES, STEMS
from .utils.fileio import atomic_write_text

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and the valid ones."""


@dataclass
class ModelConfig:
    backbone: str = "resnet"  # "resnet" or "vgg16"
    blocks: list[int] = field(default_factory=lambda: [3, 4, 23, 3])  # ResNet-101
    width: int = 64
    num_classes: int | None = None  # None: the dataset's number of classes
    atrous_rates: list[int] = field(default_factory=lambda: [6, 12, 18, 24])
    # "frozen": FrozenBatchNorm2d (the paper's use_global_stats); "batch": BatchNorm2d with
    # frozen affine, batch statistics in training, running ones at test time (the released UDA
    # codes); "train": fully trainable BN. Default "frozen"
    bn: str | None = None
    frozen_bn: bool | None = None  # older key: true is bn frozen, false bn train
    weights: str | None = None  # init file (DeepLab init, torchvision, ...); None: random init
    init_head: bool = False  # also load the init file's classifier (the paper: a fresh head)
    head_mode: str = "aspp"  # "aspp": 4 branches summed; "adaptsegnet": branches 0+1 only
    alignment: str = "caffe"  # resizing convention: "caffe" (the paper's) or "pytorch"
    # "caffe": the DeepLab 7x7 stem; "v1c": mmseg's ResNetV1c deep stem (three 3x3 convs) of
    # DAFormer/HRDA/MIC's DeepLab v2, stride on the 3x3 convs (model/resnet.py)
    stem: str = "caffe"
    # first block of layer3/layer4 at half dilation (mmseg's ResLayer); None: true with the
    # v1c stem, false otherwise
    contract_dilation: bool | None = None


@dataclass
class DataConfig:
    dataset: str = "cityscapes"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    crop_size: list[int] = field(default_factory=lambda: [512, 1024])  # (height, width)
    scale_range: list[float] = field(default_factory=lambda: [0.5, 1.5])
    scales: list[float] = field(default_factory=list)  # discrete scale set; []: U(scale_range)
    flip: bool = True
    # [h, w]: resize every training image to exactly this before scaling and cropping, as the
    # domain adaptation codes load theirs (image with resize_filter, label nearest); None/[]: off
    resize: list[int] | None = None
    resize_filter: str = "bilinear"  # the image filter of data.resize: "bicubic" or "bilinear"
    batch_size: int = 2  # per process
    num_workers: int = 2
    check: str = "all"  # read every sample before training: "all", "none" or a number
    options: dict[str, Any] = field(default_factory=dict)  # extra dataset arguments
    # DAFormer's rare-class sampling of the training (source) images (deeplabv2.data.rcs):
    # {temperature: 0.01, min_pixels: 3000, min_crop_ratio: 0.5, cache: null}; null: off
    rare_class_sampling: dict[str, Any] | None = None
    # re-draw a training crop where one class covers this share or more of its labelled
    # pixels (mmseg RandomCrop; DAFormer/HRDA source: 0.75); 1: off
    cat_max_ratio: float = 1.0


@dataclass
class TrainConfig:
    iterations: int = 20000  # the length of the poly schedule
    stop_at: int = 0  # stop early at this iteration (0: at ``iterations``), as UDA papers do
    lr: float = 2.5e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    # "sgd" (momentum, the paper's) or "adamw" (betas 0.9/0.999, DAFormer's DeepLab v2 runs)
    optimizer: str = "sgd"
    # "deeplab": backbone 1x, its biases 2x, head 10x, head biases 20x, no decay on biases and
    # norms (the Caffe solver); "mmseg": head 10x, every parameter decayed (DAFormer's
    # paramwise_cfg custom_keys {head: lr_mult 10})
    param_groups: str = "deeplab"
    # mmcv's linear warm-up: lr * (1 - (1 - it / warmup_iters) * (1 - warmup_ratio)) before
    # warmup_iters (0: none), on top of the poly value at it
    warmup_iters: int = 0
    warmup_ratio: float = 1e-6
    accumulate: int = 1  # gradient accumulation steps per iteration
    loss_at: str = "stride8"  # "stride8": labels downsampled (paper); "full": logits upsampled
    msc_scales: list[float] = field(default_factory=list)  # [] off; the paper's MSC: [1, 0.75, 0.5]
    # "auto": bf16 autocast + channels-last where a probe shows it faster (AMX CPUs, GPUs with
    # bf16), FP32 elsewhere (deeplabv2.precision); "none", "bf16", "fp16" (fp16 on CUDA only)
    amp: str = "auto"
    # CUDA only: TF32 in cuDNN convolutions and matrix products (PyTorch's default on Ampere and
    # newer GPUs); false: true FP32, what the released adaptation runs computed (older GPUs)
    tf32: bool = True
    channels_last: bool = False
    # activation checkpointing of the ResNet backbone while training: its stem and each
    # bottleneck keep only their input and run again in the backward pass (about a third more
    # compute per step, far less activation memory; benchmarks/uda_memory_results.md).
    # Results, gradients and BN statistics are unchanged
    checkpoint_backbone: bool = False
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"
    seed: int = 0
    out_dir: str = "runs/experiment"
    checkpoint_every: int = 1000
    # weights-only snapshots/iter_XXXXXX.pth every N iterations (0: none); the adaptation
    # configs keep the released codes' series (deeplabv2.snapshots)
    snapshot_every: int = 0
    val_every: int = 0  # 0: validate only at the end
    val_limit: int = 0  # validate on the first N images only (0: all)
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True
    threads: int = 0  # torch CPU threads per process (0: leave PyTorch's default)
    # refuse to start when one step's estimated memory exceeds what the device has
    # (deeplabv2.memory); false: try anyway
    check_memory: bool = True


@dataclass
class EvalConfig:
    split: str = "val"
    mode: str = "whole"  # "whole" or "sliding"
    msc_scales: list[float] | None = None  # the paper's test-time MSC (max fusion): [1, 0.75, 0.5]
    avg_scales: list[float] = field(default_factory=lambda: [1.0])  # probabilities averaged
    flip: bool = False
    crop_size: list[int] | int | None = None  # sliding window [h, w]
    stride: list[int] | int | None = None  # default: 2/3 of crop_size
    # what overlapping windows average: "probs", or "logits" (mmseg's slide_inference)
    window_fuse: str = "probs"
    crf: bool = False  # refine with the dense CRF (paper Sec. 3.4)
    crf_params: dict[str, Any] = field(default_factory=dict)  # DenseCRF fields; {}: defaults
    # which model of a snapshot series the paper reports (evaluate RUN_DIR prints both):
    # "final", or "best" (selected on the evaluated split, as ADVENT's TEST.MODE best)
    selection: str = "final"
    # a released evaluation script (evaluation/protocols.py): none (our front above),
    # adaptsegnet, advent, fda, dacs
    protocol: str = "none"

    def dense_crf(self, model_config: dict | None = None, force: bool = False):
        """The :class:`deeplabv2.inference.crf.DenseCRF` for a model of ``model_config``: the released
        preset of its backbone (:func:`deeplabv2.inference.crf.crf_preset`) updated by ``crf_params``.
        None when ``crf`` is off, unless ``force``."""
        params = DenseCRF.from_dict({**crf_preset(model_config).to_dict(), **self.crf_params})
        return params if (self.crf or force) else None

    def inference(self):
        """The :class:`deeplabv2.inference.front.InferenceConfig` these settings describe."""
        return InferenceConfig.from_dict({k: getattr(self, k) for k in InferenceConfig.keys()})

@dataclass
class AdaptConfig:
    """Unsupervised domain adaptation (:mod:`deeplabv2.adapt`): ``data`` is the labelled
    source, these keys the unlabelled target and the method's weights (papers' defaults)."""
    # none, source_only, adaptsegnet, advent, minent, fda, dacs, daformer, hrda
    method: str = "none"
    target_dataset: str | None = None
    target_root: str | None = None
    target_split: str = "train"
    target_options: dict[str, Any] = field(default_factory=dict)  # e.g. {annotation: null}
    # FDA's self-training round: a `deeplabv2 pseudo-label` folder, read as the target labels
    target_labels: str | None = None
    target_crop_size: list[int] | None = None  # None: data.crop_size
    target_scale_range: list[float] = field(default_factory=lambda: [1.0, 1.0])
    # data.resize and data.resize_filter for the target: its own filter, since DACS halves
    # Cityscapes bilinearly but resizes GTA5/SYNTHIA bicubically
    target_resize: list[int] | None = None
    target_resize_filter: str = "bilinear"
    target_val_split: str | None = "val"  # validate on the target (None: on the source)
    target_val_options: dict[str, Any] = field(default_factory=dict)
    multi_level: bool = False  # AdaptSegNet/ADVENT: auxiliary head on layer3
    lambda_seg_aux: float = 0.1
    lambda_adv: float = 0.001
    lambda_adv_aux: float = 0.0002
    d_lr: float = 1e-4  # discriminators: Adam, betas (0.9, 0.99), poly
    lambda_ent: float = 0.001  # MinEnt
    lambda_ent_aux: float = 0.0002
    fda_beta: float = 0.01  # 0.01 / 0.05 / 0.09 for the three models of FDA-MBT
    fda_lambda_ent: float = 0.005
    fda_eta: float = 2.0
    fda_ent_start: int = 50000  # FDA's switch2entropy
    ema_alpha: float = 0.99  # DACS (DAFormer's configs: 0.999)
    pseudo_threshold: float = 0.968
    # pseudo-label weight set to 0 in [top, bottom, left, right] rows/columns of the target
    # crop; null: the method's released value (dacs: none, daformer: [15, 120, 0, 0])
    pseudo_margins: list[int] | None = None
    # where pseudo_margins are counted: crop (its rows/columns; DACS, DAFormer) or image (of
    # the whole target image the crop was cut from, after target_resize; HRDA's plcrop v2)
    pseudo_margins_frame: str = "crop"
    # DAFormer's thing-class ImageNet feature distance (adapt.method daformer; lambda 0: off)
    fdist_lambda: float = 0.005
    fdist_classes: list[int] | None = field(
        default_factory=lambda: [6, 7, 11, 12, 13, 14, 15, 16, 17, 18])  # null: every cell
    fdist_min_ratio: float = 0.75
    # MIC's masked image consistency on top of dacs or daformer (deeplabv2.adapt.mic): null
    # off; a mapping {mask_ratio: 0.7, block_size: 64, lambda: 1.0, augment: true} (missing
    # keys take these values; MIC's DeepLab v2 rows on 512x512 crops use block_size 32)
    mic: dict[str, Any] | None = None
    # HRDA (adapt.method hrda, deeplabv2.model.hrda): null takes the released value (HRDA
    # experiments.py 'hrda1-512-0.1'): the detail crop [512, 512] inside the training crop, its
    # loss weight 0.1 (the fused prediction's 0.9), the context crop at scale 0.5
    hrda_detail_crop: list[int] | None = None
    hrda_detail_weight: float | None = None
    hrda_context_scale: float | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTION_TYPES = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
                  "eval": EvalConfig, "adapt": AdaptConfig}


def _section(name: str, values: dict) -> Any:
    cls = _SECTION_TYPES[name]
    valid = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(values, dict):
        raise ConfigError(f"section {name!r} must be a mapping, got {values!r}")
    for key in values:
        if key not in valid:
            raise ConfigError(f"unknown key {name}.{key}; valid keys of {name!r}: "
                              + ", ".join(valid))
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    values = {k: _coerce(f"{name}.{k}", v, types[k]) for k, v in values.items()}
    return cls(**values)


# 1e-3, 1E-3, 5e-4, .5, 0.1, 3: YAML 1.1 reads the exponent forms without a dot as strings.
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _number(key: str, value, integer: bool = False):
    """``value`` as a finite number (``int`` when ``integer``); a :class:`ConfigError` naming
    ``key`` otherwise (a string in a usual number form is read as the number)."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        value = float(value.strip()) if not integer or not value.strip().lstrip("+-").isdigit() \
            else int(value.strip())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if integer:
        if float(value) != int(value):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    return float(value) if isinstance(value, float) else value


def _coerce(key: str, value, type_name: str):
    """Numbers of ``float``/``int`` fields (and lists of them) in the usual written forms."""
    if value is None:
        return value
    if type_name == "float":
        return float(_number(key, value))
    if type_name in ("int", "int | None"):
        return _number(key, value, integer=True)
    if type_name == "list[float]" and isinstance(value, (list, tuple)):
        return [float(_number(f"{key}[{i}]", v)) for i, v in enumerate(value)]
    if type_name == "list[int]" and isinstance(value, (list, tuple)):
        return [_number(f"{key}[{i}]", v, integer=True) for i, v in enumerate(value)]
    return value


def from_dict(d: dict) -> Config:
    d = d or {}
    for key in d:
        if key not in _SECTION_TYPES:
            raise ConfigError(f"unknown section {key!r}; valid sections: "
                              + ", ".join(_SECTION_TYPES))
    cfg = Config(**{name: _section(name, d.get(name, {})) for name in _SECTION_TYPES})
    validate(cfg)
    return cfg


def resolve_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    packaged = CONFIG_DIR / f"{name_or_path}.yaml"
    if packaged.is_file():
        return packaged
    names = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"{name_or_path}: no such config file, and not a packaged config "
                      f"({', '.join(names)})")


def load_config(name_or_path: str | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults) and apply ``section.key=value`` overrides."""
    d: dict = {}
    if name_or_path:
        path = resolve_path(name_or_path)
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({e})") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) != 2:
            raise ConfigError(f"override {item!r} must look like section.key=value "
                              "(e.g. train.iterations=100)")
        section, name = parts
        d.setdefault(section, {})
        if isinstance(d[section], dict):
            d[section][name] = yaml.safe_load(value) if value != "" else None
    return from_dict(d)


def validate(cfg: Config) -> None:
    t, m, data = cfg.train, cfg.model, cfg.data
    choices = {("train", "amp"): (t.amp, ("auto", "none", "bf16", "fp16")),
               ("train", "loss_at"): (t.loss_at, ("stride8", "full")),
               ("model", "backbone"): (m.backbone, ("resnet", "vgg16")),
               ("model", "head_mode"): (m.head_mode, ("aspp", "adaptsegnet")),
               ("model", "alignment"): (m.alignment, ("caffe", "pytorch")),
               ("model", "stem"): (m.stem, STEMS),
               ("eval", "selection"): (cfg.eval.selection, ("final", "best"))}
    for (sec, key), (value, valid) in choices.items():
        if value not in valid:
            raise ConfigError(f"{sec}.{key}={value!r}; valid values: {', '.join(valid)}")
    _resolve_bn(m)
    if m.contract_dilation not in (None, True, False):
        raise ConfigError(f"model.contract_dilation={m.contract_dilation!r}; valid values: "
                          "true, false, null (true with model.stem=v1c)")
    if m.backbone != "resnet" and (m.stem != "caffe" or m.contract_dilation):
        raise ConfigError("model.stem and model.contract_dilation apply to the ResNet backbone "
                          f"only (model.backbone={m.backbone!r})")
    positive = {"train.iterations": t.iterations, "train.accumulate": t.accumulate,
                "data.batch_size": data.batch_size, "train.checkpoint_every": t.checkpoint_every,
                "train.log_every": t.log_every}
    for key, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    if not isinstance(t.snapshot_every, int) or t.snapshot_every < 0:
        raise ConfigError(f"train.snapshot_every must be 0 (no snapshots) or a positive "
                          f"number of iterations, got {t.snapshot_every!r}")
    if not isinstance(t.stop_at, int) or not 0 <= t.stop_at <= t.iterations:
        raise ConfigError(f"train.stop_at must be 0 or an iteration <= train.iterations "
                          f"({t.iterations}), got {t.stop_at!r}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {t.lr}")
    for key in ("momentum", "weight_decay", "poly_power"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key} must be >= 0, got {getattr(t, key)}")
    for key, valid in (("optimizer", ("sgd", "adamw")), ("param_groups", ("deeplab", "mmseg"))):
        if getattr(t, key) not in valid:
            raise ConfigError(f"train.{key}={getattr(t, key)!r}; valid values: "
                              + ", ".join(valid))
    if isinstance(t.warmup_iters, bool) or not isinstance(t.warmup_iters, int) \
            or t.warmup_iters < 0:
        raise ConfigError(f"train.warmup_iters must be 0 (no warm-up) or a positive number of "
                          f"iterations, got {t.warmup_iters!r}")
    if not 0 < t.warmup_ratio <= 1:
        raise ConfigError(f"train.warmup_ratio must be in (0, 1] (mmcv's), got "
                          f"{t.warmup_ratio!r}")
    _check_resize("data", data.resize, data.resize_filter)
    if not 0 < data.cat_max_ratio <= 1:
        raise ConfigError(f"data.cat_max_ratio must be in (0, 1] (1: off), got "
                          f"{data.cat_max_ratio!r}")
    if data.rare_class_sampling is not None:
        from .data.rcs import RCSSettings
        try:
            RCSSettings.from_dict(data.rare_class_sampling)
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None
    if len(data.crop_size) != 2 or min(data.crop_size) < 1:
        raise ConfigError(f"data.crop_size must be [height, width], got {data.crop_size}")
    lo, hi = data.scale_range
    if not 0 < lo <= hi:
        raise ConfigError(f"data.scale_range must be [low, high] with 0 < low <= high, got "
                          f"{data.scale_range}")
    try:
        cfg.eval.inference()
        cfg.eval.dense_crf()
    except ValueError as e:
        raise ConfigError(f"eval: {e}") from None
    _validate_protocol(cfg.eval)
    if any(not isinstance(s, (int, float)) or s <= 0 for s in data.scales):
        raise ConfigError(f"data.scales must be positive numbers, got {data.scales}")
    if any(s <= 0 for s in t.msc_scales):
        raise ConfigError(f"train.msc_scales must be positive, got {t.msc_scales}")
    if t.msc_scales and t.loss_at != "stride8":
        raise ConfigError("train.msc_scales needs train.loss_at=stride8 (each of the four "
                          "outputs is compared with labels resized to its own size)")
    _validate_adapt(cfg)
    if not isinstance(t.tf32, bool):
        raise ConfigError(f"train.tf32 must be true or false, got {t.tf32!r}")
    if not isinstance(t.checkpoint_backbone, bool):
        raise ConfigError(f"train.checkpoint_backbone must be true or false, got "
                          f"{t.checkpoint_backbone!r}")
    if t.checkpoint_backbone and cfg.model.backbone != "resnet":
        raise ConfigError(f"train.checkpoint_backbone applies to the ResNet backbone only, "
                          f"not model.backbone={cfg.model.backbone!r}")
    if not isinstance(t.check_memory, bool):
        raise ConfigError(f"train.check_memory must be true or false, got {t.check_memory!r}")
    if data.check not in ("all", "none") and not str(data.check).isdigit():
        raise ConfigError(f"data.check must be 'all', 'none' or a number, got {data.check!r}")


def _validate_protocol(e: EvalConfig) -> None:
    """``eval.protocol`` names a released protocol, which fixes the test-time mode."""
    from .evaluation.protocols import NAMES
    if e.protocol not in NAMES:
        raise ConfigError(f"eval.protocol must be one of {', '.join(NAMES)}, got "
                          f"{e.protocol!r}")
    if e.protocol != "none" and (e.inference() != InferenceConfig() or e.crf):
        raise ConfigError(f"eval.protocol {e.protocol!r} fixes how images are run (resize, one "
                          f"pass, upsampling to the labels); drop eval.mode/msc_scales/"
                          f"avg_scales/flip/crf or set eval.protocol: none")


def _resolve_bn(m: ModelConfig) -> None:
    """``model.bn`` from itself or the older ``model.frozen_bn`` (true: frozen, false: train),
    which is then cleared, so that a saved config holds ``bn`` alone and takes an override of
    it; both given and disagreeing is an error naming both."""
    if m.frozen_bn is not None and not isinstance(m.frozen_bn, bool):
        raise ConfigError(f"model.frozen_bn must be true or false, got {m.frozen_bn!r}")
    if m.bn is not None and m.bn not in BN_MODES:
        raise ConfigError(f"model.bn={m.bn!r}; valid values: {', '.join(BN_MODES)}")
    implied = None if m.frozen_bn is None else ("frozen" if m.frozen_bn else "train")
    if m.bn is not None and implied is not None and m.bn != implied:
        raise ConfigError(f"model.bn={m.bn!r} contradicts model.frozen_bn={m.frozen_bn!r} "
                          "(frozen_bn true is bn frozen, false is bn train): give only model.bn")
    m.bn, m.frozen_bn = m.bn or implied or "frozen", None


def _validate_adapt(cfg: Config) -> None:
    a = cfg.adapt
    if a.method not in METHODS:
        raise ConfigError(f"adapt.method={a.method!r}; valid values: {', '.join(METHODS)}")
    _check_resize("adapt", a.target_resize, a.target_resize_filter, prefix="target_")
    _validate_mic(cfg)
    _validate_hrda(cfg)
    if a.method in ("none", "source_only"):
        return
    if not a.target_dataset:
        raise ConfigError(f"adapt.method={a.method} needs adapt.target_dataset (and "
                          "adapt.target_root): the unlabelled target images")
    if a.multi_level and (cfg.model.backbone != "resnet" or cfg.train.msc_scales):
        raise ConfigError("adapt.multi_level needs the ResNet backbone and no train.msc_scales")
    if a.target_labels and a.method != "fda":
        raise ConfigError(f"adapt.target_labels is read by adapt.method=fda only (its "
                          f"self-training round), not by {a.method}")
    _validate_self_training(cfg)
    if a.method in ("fda", "dacs", "daformer", "hrda") and \
            a.target_crop_size not in (None, cfg.data.crop_size):
        raise ConfigError(f"adapt.method={a.method} mixes source and target crops: "
                          f"adapt.target_crop_size must equal data.crop_size")


def _validate_self_training(cfg: Config) -> None:
    """The keys of the self-training core (``pseudo_margins``) and of DAFormer's feature
    distance (``fdist_*``), named with the wrong value."""
    a = cfg.adapt
    if not 0 <= a.ema_alpha < 1:
        raise ConfigError(f"adapt.ema_alpha must be in [0, 1), got {a.ema_alpha!r}")
    m = a.pseudo_margins
    if m is not None and (not isinstance(m, (list, tuple)) or len(m) != 4 or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in m)):
        raise ConfigError(f"adapt.pseudo_margins must be [top, bottom, left, right] "
                          f"(non-negative integers) or null, got {m!r}")
    if m is not None and a.method not in ("dacs", "daformer", "hrda"):
        raise ConfigError(f"adapt.pseudo_margins is read by the self-training methods (dacs, "
                          f"daformer, hrda), not by {a.method}")
    if a.pseudo_margins_frame not in ("crop", "image"):
        raise ConfigError(f"adapt.pseudo_margins_frame must be crop or image, got "
                          f"{a.pseudo_margins_frame!r}")
    if a.pseudo_margins_frame != "crop" and a.method not in ("dacs", "daformer", "hrda"):
        raise ConfigError(f"adapt.pseudo_margins_frame is read by the self-training methods "
                          f"(dacs, daformer, hrda), not by {a.method}")
    if a.method not in ("daformer", "hrda"):
        return
    if a.fdist_lambda < 0:
        raise ConfigError(f"adapt.fdist_lambda must be >= 0, got {a.fdist_lambda!r}")
    if not 0 <= a.fdist_min_ratio <= 1:
        raise ConfigError(f"adapt.fdist_min_ratio must be in [0, 1], got {a.fdist_min_ratio!r}")
    n = cfg.model.num_classes
    if a.fdist_classes is not None and any(
            isinstance(c, bool) or not isinstance(c, int) or c < 0 or (n and c >= n)
            for c in a.fdist_classes):
        raise ConfigError(f"adapt.fdist_classes must be class indices"
                          f"{f' below model.num_classes ({n})' if n else ''}, got "
                          f"{a.fdist_classes!r}")
    if cfg.train.msc_scales or a.multi_level:
        raise ConfigError(f"adapt.method={a.method} takes no train.msc_scales or "
                          "adapt.multi_level "
                          "(its feature distance reads the single-scale backbone output)")


def _validate_mic(cfg: Config) -> None:
    """``adapt.mic``: read by the self-training methods only, its keys and values checked, the
    mask grid at least one cell on the crop; written back in full (defaults filled in), so the
    saved config says what ran."""
    a = cfg.adapt
    if a.mic is None:
        return
    if a.method not in ("dacs", "daformer", "hrda"):
        raise ConfigError(f"adapt.mic (MIC) is an option of the self-training methods (dacs, "
                          f"daformer, hrda), not of adapt.method={a.method}")
    try:
        mic = mic_settings(a.mic)
        block_grid(*cfg.data.crop_size, mic.block_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    a.mic = mic.as_config()


def _validate_hrda(cfg: Config) -> None:
    """``adapt.hrda_*``: read by ``adapt.method: hrda`` only; null filled in with the released
    values (so the saved config says what ran); the detail crop inside the training crop on
    the 8-pixel grid, the context crop on it too; the ResNet backbone (an ASPP head)."""
    a = cfg.adapt
    keys = ("hrda_detail_crop", "hrda_detail_weight", "hrda_context_scale")
    if a.method != "hrda":
        given = [k for k in keys if getattr(a, k) is not None]
        if given:
            raise ConfigError(f"adapt.{given[0]} is read by adapt.method=hrda only, not by "
                              f"{a.method}")
        return
    from .model.hrda import CONTEXT_SCALE, DETAIL_CROP, DETAIL_LOSS_WEIGHT
    if cfg.model.backbone != "resnet":
        raise ConfigError(f"adapt.method=hrda needs the ResNet backbone (an ASPP head for its "
                          f"scale attention), got model.backbone={cfg.model.backbone!r}")
    crop = a.hrda_detail_crop if a.hrda_detail_crop is not None else [DETAIL_CROP] * 2
    if isinstance(crop, int) and not isinstance(crop, bool):
        crop = [crop, crop]
    if not isinstance(crop, (list, tuple)) or len(crop) != 2 or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 8 or v % 8 for v in crop):
        raise ConfigError(f"adapt.hrda_detail_crop must be [height, width] (positive "
                          f"multiples of 8) or null, got {a.hrda_detail_crop!r}")
    weight = DETAIL_LOSS_WEIGHT if a.hrda_detail_weight is None else \
        _number("adapt.hrda_detail_weight", a.hrda_detail_weight)
    if not 0 <= weight < 1:
        raise ConfigError(f"adapt.hrda_detail_weight must be in [0, 1), got "
                          f"{a.hrda_detail_weight!r}")
    scale = CONTEXT_SCALE if a.hrda_context_scale is None else \
        _number("adapt.hrda_context_scale", a.hrda_context_scale)
    if not 0 < scale <= 1:
        raise ConfigError(f"adapt.hrda_context_scale must be in (0, 1], got "
                          f"{a.hrda_context_scale!r}")
    size = list(cfg.data.crop_size)
    for name, c, d in (("height", size[0], crop[0]), ("width", size[1], crop[1])):
        context = c * scale
        if c % 8 or context != int(context) or int(context) % 8:
            raise ConfigError(f"adapt.method=hrda: data.crop_size {name} {c} must be a "
                              f"multiple of 8 that is one again at adapt.hrda_context_scale "
                              f"{scale} (the context crop on the stride-8 grid)")
        if d > c:
            raise ConfigError(f"adapt.hrda_detail_crop {list(crop)} is larger than "
                              f"data.crop_size {size}")
    a.hrda_detail_crop, a.hrda_detail_weight, a.hrda_context_scale = \
        [int(v) for v in crop], float(weight), float(scale)


def _check_resize(section: str, size, image_filter, prefix: str = "") -> None:
    """``{section}.{prefix}resize`` is None, [] or [height, width] of positive integers, and
    ``{section}.{prefix}resize_filter`` one of the image filters."""
    key = f"{section}.{prefix}resize"
    if size is not None and size != []:
        if (not isinstance(size, (list, tuple)) or len(size) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size)):
            raise ConfigError(f"{key} must be [height, width] (positive integers), or null or "
                              f"[] for no resize, got {size!r}")
    if image_filter not in RESIZE_FILTERS:
        raise ConfigError(f"{key}_filter={image_filter!r}; valid values: "
                          + ", ".join(RESIZE_FILTERS))


def save_config(cfg: Config, path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
