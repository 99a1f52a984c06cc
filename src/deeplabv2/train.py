"""The training loop: :func:`train` does everything ``deeplabv2 train`` does.

It reads in three parts: set-up (:func:`_set_up`: device, data, network, optimizer, method,
a resume), the loop (:func:`_loop`: one optimizer step per iteration, then validation,
checkpoints and logs on their schedule) and the end (:func:`_finish`). Every run is a
:class:`~deeplabv2.adapt.methods.Method`, plain supervised training the base one, so the loop
has one path whatever the method and the precision. Beside it: the data order in
:mod:`deeplabv2.data.sampler`, checkpoints and the run folder's rules in
:mod:`deeplabv2.checkpoint`, the progress bar, ``history.json`` and TensorBoard in
:mod:`deeplabv2.utils.logger`.

Recipe (paper Sec. 4; DeepLab-v2 ``solver.prototxt``): SGD with momentum 0.9 and weight decay
5e-4, the model's 1x/10x/20x parameter groups, "poly" learning rate
``lr * (1 - it / max_it) ** 0.9`` applied to every group with its multiplier, iteration based,
cross-entropy with 255 ignored against labels shrunk to the stride-8 scores (each score cell
against the label pixel under its centre: pixels 0, 8, 16, ... as Caffe's ``label_shrink``).

Runs as one process or as many under ``torchrun`` (DDP): rank 0 logs and writes checkpoints,
every rank sees its own slice of each global batch, metrics are summed across ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.nn import functional as F

from .utils import distributed as dist_utils
from .checkpoint import (TrainingError, changed_settings, load_checkpoint,
                         newest_finite_checkpoint, prepare_run_folder, save_checkpoint)
from .config import Config, save_config
from .data import IGNORE_INDEX, build_dataset
from .data.rcs import (RareClassBatchSampler, RareClassCrops, RCSSettings,
                       build_rare_class_sampling)
from .data.sampler import EpochIndexed, IterationBatchSampler
from .data.transforms import TrainTransform
from .utils.digest import all_finite
from .evaluation.evaluate import evaluate
from .utils.fileio import RunLock, atomic_write_text, remove_stale_tmp
from .utils.logger import TrainLog, read_history
from .snapshots import SNAPSHOT_DIR, remove_snapshots_after, save_snapshot
from .utils.visualize import colorize
from .evaluation.metrics import save_json
from .adapt.methods import Method, Step, build_method
from .memory import check_training_memory, crop_warnings
from .model import MSC, DeepLabV2, build_model, get_alignment, msc_loss
from .model.resnet import set_backbone_checkpointing
from .precision import autocast_context, resolve_train_amp
from .weights import load_weights, save_weights


class Interrupted(TrainingError):
    """Ctrl-C (SIGINT) or SIGTERM: the current iteration was finished and a resumable checkpoint
    written; ``exit_code`` is the shell's ``128 + signal``."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


# -- the recipe's pieces ------------------------------------------------------------------------
def poly_lr(base_lr: float, iteration: int, max_iterations: int, power: float = 0.9) -> float:
    """The paper's "poly" policy: ``base_lr * (1 - iteration / max_iterations) ** power``."""
    return base_lr * (1.0 - iteration / max_iterations) ** power


def warmup_poly_lr(base_lr: float, iteration: int, max_iterations: int, power: float = 0.9,
                   warmup_iters: int = 0, warmup_ratio: float = 1e-6) -> float:
    """:func:`poly_lr`, times mmcv's linear warm-up factor before ``warmup_iters``
    (``LrUpdaterHook.get_warmup_lr``, 'linear': ``1 - (1 - it / warmup_iters) * (1 -
    warmup_ratio)``, applied to the poly value at ``it``; DAFormer's
    ``configs/_base_/schedules/poly10warm.py``: 1500 iterations, ratio 1e-6, power 1.0, min_lr
    0). ``warmup_iters=0`` is :func:`poly_lr`."""
    lr = poly_lr(base_lr, iteration, max_iterations, power)
    if iteration < warmup_iters:
        lr *= 1.0 - (1.0 - iteration / warmup_iters) * (1.0 - warmup_ratio)
    return lr


def build_optimizer(model, t) -> torch.optim.Optimizer:
    """``train.optimizer`` over ``model``'s ``train.param_groups``: SGD with momentum (the
    paper), or AdamW with betas (0.9, 0.999), eps 1e-8 (DAFormer's
    ``configs/_base_/schedules/adamw.py``: lr 6e-5, weight decay 0.01)."""
    groups = model.param_groups(t.lr, t.weight_decay, style=t.param_groups)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.999),
                                 weight_decay=t.weight_decay)
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, loss_at: str,
                      alignment=None) -> torch.Tensor:
    """Cross-entropy (mean over non-ignored pixels) of ``(N, C, h, w)`` scores vs ``(N, H, W)``.

    ``stride8``: each score cell is compared with the label under its centre (the paper;
    ``alignment.shrink_labels``: pixels 0, 8, 16, ... under the default ``"caffe"``);
    ``full``: scores are upsampled to the labels (``alignment.upsample``).
    """
    align = get_alignment(alignment)
    if loss_at == "stride8":
        if labels.shape[-2:] != logits.shape[-2:]:
            labels = align.shrink_labels(labels, logits.shape[-2:])
    else:
        logits = align.upsample(logits, labels.shape[-2:])
    if not (labels != IGNORE_INDEX).any():  # an all-ignore crop: no signal, but no NaN either
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)


@dataclass
class TrainResult:
    out_dir: Path
    iterations: int
    # {"iteration", "loss", "lr", "seconds_per_iteration"} per log window (+ "val_miou")
    history: list[dict] = field(default_factory=list)
    metrics: dict | None = None  # final validation metrics
    best_miou: float | None = None
    model: DeepLabV2 | None = None


def _check_dataset(ds, how: str) -> None:
    """``data.check``: read every sample ("all"), the first N, or none (emptiness is always
    an error)."""
    ds.check(limit=None if how == "all" else 0 if how == "none" else int(how))


def _require_init_weights(weights: str | None, resume: str | None) -> None:
    """A missing init file fails before the data is checked, saying where to get one."""
    if not weights or resume or Path(weights).is_file():
        return
    raise TrainingError(
        f"model.weights={weights}: file not found. Init weights are not shipped with deeplabv2: "
        "download the DeepLab v2 init files (DeepLab_resnet_pretrained_imagenet.pth, "
        "MS_DeepLab_resnet_pretrained_COCO_init.pth: the PyTorch conversions of the Caffe "
        "models published with kazuto1011/deeplab-pytorch and AdaptSegNet) or a torchvision "
        "ResNet-101 file, and pass model.weights=PATH; model.weights=null trains from scratch "
        "(with model.bn=train; far lower mIoU)")


def _build_model(cfg: Config, num_classes: int) -> DeepLabV2:
    m = cfg.model
    config = {"backbone": m.backbone, "num_classes": m.num_classes or num_classes,
              "atrous_rates": m.atrous_rates}
    if m.backbone == "resnet":
        config.update(blocks=m.blocks, width=m.width, bn=m.bn, frozen_bn=m.frozen_bn,
                      head_mode=m.head_mode, aux_head=cfg.adapt.multi_level, stem=m.stem,
                      contract_dilation=m.contract_dilation)
    elif m.head_mode != "aspp":
        raise ValueError(f"model.head_mode={m.head_mode!r} applies to the ResNet backbone only")
    if config["num_classes"] != num_classes:
        raise ValueError(f"model.num_classes={m.num_classes} but dataset {cfg.data.dataset!r} "
                         f"has {num_classes} classes")
    model = build_model(config)
    model.alignment = get_alignment(m.alignment)
    if m.weights:
        # The paper trains a fresh classifier (N(0, 0.01), zero bias) on the init file's
        # backbone; the init files' own layer5 head (one random draw of the converter, non-zero
        # bias) is loaded only when asked for (model.init_head).
        load_weights(model, m.weights, head="auto" if m.init_head else "skip",
                     alignment=m.alignment)  # sets model.load_report
    a = cfg.adapt
    if a.method == "hrda":
        # HRDA's wrapper around the network as initialised (the init file is the network's):
        # its scale-attention head is new, drawn from the seed as the classifier is
        from .model.hrda import HRDA
        report = model.load_report
        model = HRDA(model, detail_crop=list(a.hrda_detail_crop),
                     context_scale=a.hrda_context_scale)
        model.load_report = report
    return model


class _StopSignals:
    """SIGINT/SIGTERM ask the loop to finish its iteration, save and stop (a second Ctrl-C stops
    at once). Only the main thread can install signal handlers; elsewhere this does nothing."""

    def __init__(self, announce: bool):
        self.signum: int | None = None
        self.announce = announce
        self._old: dict = {}

    def install(self) -> None:
        """Install the handlers (called right before the loop: a Ctrl-C while the data is
        checked or the model built stops at once, as usual)."""
        if threading.current_thread() is threading.main_thread() and not self._old:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:  # asked twice: stop now (last.pth is the last periodic one)
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:
            print("\ninterrupt: finishing this iteration, then saving a resumable checkpoint "
                  "(press Ctrl-C again to stop at once)", flush=True)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C and SIGTERM to the main process, which stops cleanly
    (a worker whose parent is gone exits by itself)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def set_tf32(device: torch.device, enabled: bool) -> None:
    """On CUDA, allow TF32 in cuDNN convolutions and CUDA matrix products or not
    (``train.tf32``). PyTorch allows it in convolutions by default, so an Ampere or newer GPU
    runs ``amp: none`` with 10-bit mantissas in every convolution; the released adaptation runs
    were FP32 on GPUs without TF32, which ``tf32: false`` reproduces. Nothing changes on a
    CPU."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.allow_tf32 = bool(enabled)
        torch.backends.cuda.matmul.allow_tf32 = bool(enabled)


def _resolve_amp(cfg: Config, device: torch.device) -> tuple[Config, str]:
    """``cfg`` with ``train.amp: auto`` replaced by the choice that is faster on ``device``
    (:func:`deeplabv2.precision.resolve_train_amp`, agreed by all ranks), and a line that
    says why; the run's ``config.yaml`` records the choice."""
    amp, channels_last, why = resolve_train_amp(cfg.train.amp, cfg.train.channels_last, device)
    if cfg.train.amp == "auto":  # every rank runs as the slowest one's probe says
        votes = dist_utils.all_reduce_sum(torch.tensor([float(amp == "bf16"), 1.0],
                                                       device=device))
        # fewer bf16 votes than ranks: some rank chose FP32. Only news where this one chose
        # bf16, and then there is another rank (a single process's own FP32 is said by why)
        if amp == "bf16" and votes[0] < votes[1]:
            amp, channels_last = "none", cfg.train.channels_last
            why += "; another rank measured FP32 faster: FP32 on every rank"
    train_cfg = dataclasses.replace(cfg.train, amp=amp, channels_last=channels_last)
    return dataclasses.replace(cfg, train=train_cfg), why


# -- train(): the run folder, then set-up, the loop and the end ----------------------------------
def train(cfg: Config, resume: str | None = None,
          on_iteration: Callable[[int, dict], None] | None = None, *,
          overwrite: bool = False, allow_changes: bool = False) -> TrainResult:
    """Train as ``cfg`` says; resume from ``resume`` (a checkpoint path, or ``"auto"`` for
    ``out_dir/last.pth``, an error when it does not exist). ``on_iteration(iteration, logs)`` is
    called after each optimizer step. Returns a :class:`TrainResult`; artefacts are in
    ``cfg.train.out_dir``: ``config.yaml``, ``last.pth`` (training checkpoint), ``best.pth``,
    ``model.pth``, ``history.json``, ``metrics.json``, TensorBoard logs in ``tb/`` and, with
    ``train.snapshot_every``, weights-only snapshots in ``snapshots/`` (:mod:`.snapshots`; a
    resume removes those taken after its checkpoint and continues the series).

    Safety: a folder that holds a run is refused unless ``resume`` or ``overwrite`` (which
    deletes the old run's files first); ``out_dir/.lock`` keeps a second writer out (a lock left
    by a dead process is taken over); a resume whose checkpoint was trained with other
    :data:`~deeplabv2.checkpoint.RUN_SETTINGS` is refused unless ``allow_changes``.
    SIGINT/SIGTERM finish the current iteration, write ``last.pth`` and raise
    :class:`Interrupted`.
    """
    out_dir = Path(cfg.train.out_dir)
    is_main = int(os.environ.get("RANK", "0")) == 0
    lock = RunLock(out_dir).acquire() if is_main else None
    try:
        resume = prepare_run_folder(out_dir, resume, overwrite, is_main)
        if is_main:
            for p in [*remove_stale_tmp(out_dir), *remove_stale_tmp(out_dir / SNAPSHOT_DIR)]:
                print(f"removed {p} (an unfinished write of an earlier, killed run)")
        signals = _StopSignals(announce=is_main)
        try:
            return _train(cfg, resume, on_iteration, allow_changes, signals)
        finally:
            signals.restore()
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Config, resume: str | None, on_iteration, allow_changes: bool,
           signals: _StopSignals) -> TrainResult:
    run = _set_up(cfg, resume, allow_changes)
    try:
        _loop(run, on_iteration, signals)
    finally:  # an error, a signal or the end: no loader worker outlives the loop
        _shut_down_loaders(run)
    return _finish(run)


# -- set-up ---------------------------------------------------------------------------------------
@dataclass
class _Run:
    """What set-up hands the loop; the loop updates ``best`` and ``metrics``."""

    cfg: Config
    info: dist_utils.DistInfo
    device: torch.device
    model: DeepLabV2  # the plain network: the optimizer, checkpoints and evaluation use it
    net: torch.nn.Module  # the network as the loop calls it: MSC- and DDP-wrapped as configured
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    method: Method
    make_step: Callable[..., Step]  # Step(images=, labels=, target=, iteration=) for the method
    batches: Iterator[dict]  # this rank's source batch of each micro-step from `start` on
    target_batches: Iterator[dict] | None  # and its target batch, when the method needs one
    val_ds: object
    classes: list[str]
    palette: np.ndarray | None
    run_config: dict  # recorded in the checkpoints
    resume: str | None
    start: int  # iterations done before (a resumed run)
    stop: int
    log: TrainLog
    best: float | None = None
    metrics: dict | None = None  # of the newest validation

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.out_dir)


def _set_up(cfg: Config, resume: str | None, allow_changes: bool) -> _Run:
    """Everything before the first iteration. The order is part of the run: the model's and the
    method's initialisation draw from the seed set here, before a resume restores its RNG."""
    _require_init_weights(cfg.model.weights, resume)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = dist_utils.pick_device(cfg.train.device)
    info = dist_utils.init_distributed(device)
    cfg, amp_choice = _resolve_amp(cfg, device)
    t = cfg.train
    set_tf32(device, t.tf32)
    autocast_context(device, t.amp)  # fails now, not at the first step, for fp16 on a CPU
    torch.manual_seed(t.seed + info.rank)

    train_ds, val_ds, target_ds = _datasets(cfg)
    rcs = None  # before anything is written: a class without images fails the run here
    if cfg.data.rare_class_sampling is not None:
        rcs = _rare_class_sampling(train_ds, RCSSettings.from_dict(cfg.data.rare_class_sampling),
                                   info, t.progress)
    if info.is_main:
        for line in crop_warnings(cfg, train_ds, target_ds):
            print(line, file=sys.stderr)
    model = _build_model(cfg, train_ds.num_classes).to(device)
    set_backbone_checkpointing(model, t.checkpoint_backbone)  # before the teachers copy it
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, t)
    method = build_method(cfg.adapt, model).to(device)
    dist_utils.broadcast_module(method)  # one initialisation on every rank, as DDP's
    # One micro-step for every precision: unless fp16, the scaler is disabled (scale() and
    # update() pass through, step() is optimizer.step()) and has no state to checkpoint.
    scaler = torch.amp.GradScaler(device.type, enabled=t.amp == "fp16")
    start, best = 0, None
    if resume:
        start, best = _resume(resume, cfg, info, model, optimizer, scaler, method,
                              allow_changes)
    net, make_step = _network(cfg, model, info, device)
    # Before anything is written (a refused resume keeps its config.yaml) and before the
    # loader's workers make the first batches: one line, not a kill by the kernel.
    memory_line = check_training_memory(cfg, model, optimizer, method, make_step, net, device, info,
                                 iteration=max(start, (t.stop_at or t.iterations) - 1))
    out_dir = Path(t.out_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        for p in remove_snapshots_after(out_dir, start) if resume else ():
            print(f"removed {p} (taken after iteration {start}, which this run resumes from)")
        if t.progress:
            print(amp_choice)
            if memory_line:
                print(memory_line)

    batches, target_batches = _batches(cfg, train_ds, target_ds if method.needs_target else None,
                                       model.preprocessing, start, info, device, rcs)
    stop = t.stop_at or t.iterations  # the poly schedule runs over t.iterations regardless
    history = read_history(out_dir / "history.json") if (resume and info.is_main) else []
    log = TrainLog(start, stop, t.log_every, history, progress=t.progress and info.is_main,
                   tensorboard=out_dir / "tb" if (t.tensorboard and info.is_main) else None)
    return _Run(cfg=cfg, info=info, device=device, model=model, net=net, optimizer=optimizer,
                scaler=scaler, method=method, make_step=make_step, batches=batches,
                target_batches=target_batches, val_ds=val_ds, classes=list(train_ds.classes),
                palette=train_ds.palette,
                run_config={**cfg.to_dict(), "world_size": info.world_size}, resume=resume,
                start=start, stop=stop, log=log, best=best)


def _datasets(cfg: Config):
    """The training, validation and (adaptation) target sets, checked up front so that a bad
    file fails now, not hours into the run."""
    d, a, seed = cfg.data, cfg.adapt, cfg.train.seed
    train_ds = build_dataset(d.dataset, d.root, d.train_split, seed=seed, **d.options)
    val_ds = build_dataset(d.dataset, d.root, d.val_split, seed=seed, **d.options)
    target_ds = None
    if a.method not in ("none", "source_only"):  # the unlabelled target images
        target_ds = build_dataset(a.target_dataset, a.target_root, a.target_split,
                                  seed=seed + 1, **a.target_options)
        if a.target_labels:  # FDA's self-training round: pseudo-labels as target labels
            from .adapt.pseudo_labels import PseudoLabelled
            target_ds = PseudoLabelled(target_ds, a.target_labels)
        _check_dataset(target_ds, d.check)
    if a.method != "none" and a.target_val_split:  # adaptation validates on the target
        val_ds = build_dataset(a.target_dataset, a.target_root, a.target_val_split,
                               seed=seed, **a.target_val_options)
    _check_dataset(train_ds, d.check)
    _check_dataset(val_ds, d.check)
    return train_ds, val_ds, target_ds


def _resume(resume: str, cfg: Config, info, model, optimizer, scaler, method: Method,
            allow_changes: bool) -> tuple[int, float | None]:
    """Restore ``resume`` into the network, its optimizer, the scaler and the method; return
    ``(iterations done, best mIoU)``. A checkpoint trained with other settings is refused
    unless ``allow_changes``."""
    state = load_checkpoint(resume, model, optimizer, scaler)
    start, best = int(state["iteration"]), state.get("best_miou")
    changes = changed_settings(state.get("config") or {},
                               {**cfg.to_dict(), "world_size": info.world_size})
    if changes and not allow_changes:
        raise TrainingError(f"{resume}: was trained with other settings ("
                            + "; ".join(changes) + "): resuming would not continue that "
                            "run; pass --allow-changes to resume anyway, or start a new run "
                            "in another train.out_dir")
    if changes and info.is_main:
        print(f"resuming {resume} with changed settings: " + "; ".join(changes))
    if method.adapting and state.get("adapt_state") is None:
        raise TrainingError(f"{resume}: no state of adapt.method={cfg.adapt.method} to resume "
                            "(the checkpoint comes from another kind of run)")
    method.load_extra_state(state.get("adapt_state"))
    return start, best


def _network(cfg: Config, model: DeepLabV2, info, device: torch.device):
    """The network as the loop calls it, and the maker of the method's :class:`Step` with the
    run's losses in it."""
    t = cfg.train
    # The optimizer, checkpoints and evaluation use the plain model; MSC only wraps the forward.
    msc = MSC(model, t.msc_scales) if t.msc_scales else None
    net = msc if msc is not None else model
    if info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    align = model.alignment

    def seg(scores, y):
        return segmentation_loss(scores, y, t.loss_at, align)

    def source_msc_loss(outputs, y):  # [s_1, s_0.75, s_0.5, max-fused], each vs its own labels
        return msc_loss(outputs, y, seg, msc.input_sizes(*y.shape[-2:]), align)

    return net, functools.partial(Step, net=net, model=model, seg_loss=seg,
                                  msc_loss=source_msc_loss if msc is not None else None)


def _batches(cfg: Config, train_ds, target_ds, preprocessing, start: int, info,
             device: torch.device, rcs=None):
    """Iterators over this rank's source batch, and target batch (when ``target_ds``), of every
    micro-step from iteration ``start`` on; the order is a pure function of the step. With
    ``rcs`` (a :class:`~deeplabv2.data.rcs.RareClassSampling`) the source images and crops
    are drawn by rare-class sampling."""
    d, a, t = cfg.data, cfg.adapt, cfg.train
    steps = dict(total_steps=t.iterations * t.accumulate, start_step=start * t.accumulate,
                 rank=info.rank, world_size=info.world_size)
    transform = TrainTransform(crop_size=tuple(d.crop_size), scale_range=tuple(d.scale_range),
                               scales=d.scales, flip=d.flip, preprocessing=preprocessing,
                               resize=d.resize or None, resize_filter=d.resize_filter,
                               cat_max_ratio=d.cat_max_ratio)
    if rcs is not None:  # DAFormer's rare-class sampling of the source
        source, sampler = RareClassCrops(train_ds, transform, rcs), RareClassBatchSampler(
            rcs, d.batch_size, t.seed, **steps)
    else:
        source = EpochIndexed(train_ds, transform)
        sampler = IterationBatchSampler(len(train_ds), d.batch_size, t.seed, **steps)
    batches = iter(torch.utils.data.DataLoader(
        source, batch_sampler=sampler,
        num_workers=d.num_workers, pin_memory=device.type == "cuda", persistent_workers=False,
        worker_init_fn=_ignore_sigint if d.num_workers else None))
    if target_ds is None:
        return batches, None
    target_transform = TrainTransform(
        crop_size=tuple(a.target_crop_size or d.crop_size),
        scale_range=tuple(a.target_scale_range), flip=d.flip, preprocessing=preprocessing,
        resize=a.target_resize or None, resize_filter=a.target_resize_filter,
        crop_box=a.pseudo_margins_frame == "image")  # HRDA's margins of the whole image
    target_batches = iter(torch.utils.data.DataLoader(  # its own order, a function of the step
        EpochIndexed(target_ds, target_transform),
        batch_sampler=IterationBatchSampler(len(target_ds), d.batch_size, t.seed + 1, **steps),
        num_workers=d.num_workers, pin_memory=device.type == "cuda", persistent_workers=False,
        worker_init_fn=_ignore_sigint if d.num_workers else None))
    return batches, target_batches


def _rare_class_sampling(train_ds, settings: RCSSettings, info, progress: bool):
    """The source's :class:`~deeplabv2.data.rcs.RareClassSampling`. Under DDP rank 0 counts
    the class pixels (or reads its cache) first and the other ranks then read its cache, so
    the labels are read once, not once per rank."""
    log = (lambda line: print(line, file=sys.stderr)) if info.is_main else None
    if info.enabled and not info.is_main:
        dist_utils.barrier()
    rcs = build_rare_class_sampling(train_ds, settings, log=log)
    if info.enabled and info.is_main:
        dist_utils.barrier()
    if info.is_main and progress:  # as the released code logs "RCS Classes / ClassProb"
        names = list(train_ds.classes)
        print("rare-class sampling: " + ", ".join(
            f"{names[c]} {p:.4g}" for c, p in zip(rcs.classes, rcs.probs)))
    return rcs


def _shut_down_loaders(run: _Run) -> None:
    """Stop the source and target loaders' worker processes now. Left to the garbage collector,
    a loader whose iterator an unhandled error's traceback still holds is shut down at exit by
    ``multiprocessing``, whose SIGTERM its workers ignore (:func:`_ignore_sigint`): the process
    would wait for them forever."""
    for batches in (run.batches, run.target_batches):
        shut_down = getattr(batches, "_shutdown_workers", None)  # torch's multi-process iterator
        if shut_down is not None:
            shut_down()


# -- the loop -------------------------------------------------------------------------------------
def _loop(run: _Run, on_iteration, signals: _StopSignals) -> None:
    """Iterations ``start`` to ``stop``: each one optimizer step over ``train.accumulate``
    micro-steps of the method's passes; validation, checkpoints and logs on their schedule."""
    t, info, method = run.cfg.train, run.info, run.method
    run.net.train()
    signals.install()  # from here on, Ctrl-C finishes the iteration and saves (see _StopSignals)
    for it in range(run.start, run.stop):
        # Random draws inside the network and the method (VGG's dropout, DACS's mixing) are a
        # function of (seed, iteration, rank), so a resumed run continues them on every rank.
        torch.manual_seed((t.seed * 1_000_003 + it) * 1_009 + info.rank)
        def schedule(base_lr: float, it: int = it) -> float:
            return warmup_poly_lr(base_lr, it, t.iterations, t.poly_power, t.warmup_iters,
                                  t.warmup_ratio)
        lr = schedule(t.lr)
        set_lr(run.optimizer, lr)
        method.set_lr(schedule)
        loss_sum = torch.zeros((), device=run.device)
        for micro in range(t.accumulate):
            step = _next_step(run, it, signals)
            passes = method.passes(it)
            for k in range(passes):
                # DDP averages the gradients in the iteration's last backward; the others only
                # accumulate them on each rank.
                sync = (micro == t.accumulate - 1 and k == passes - 1) or not info.enabled
                with contextlib.nullcontext() if sync else run.net.no_sync():
                    with autocast_context(run.device, t.amp):
                        loss = method.loss(step, k) / t.accumulate
                    run.scaler.scale(loss).backward()
                loss_sum += loss.detach()
            method.discriminator_backward(t.accumulate)
        stopping = _agree_to_go_on(run, loss_sum, it, signals)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        method.step_optimizers()
        method.after_step(run.model, it)
        _check_weights(run, loss_sum, it)

        step_loss = dist_utils.all_reduce_sum(loss_sum.clone()).item() / info.world_size
        scalars = method.scalars()
        logs = {"iteration": it + 1, "loss": step_loss, "lr": lr, **scalars}
        run.log.iteration(it + 1, step_loss, lr, scalars)
        last = it + 1 == run.stop
        validate = (t.val_every and (it + 1) % t.val_every == 0) or last
        save = (it + 1) % t.checkpoint_every == 0 or last
        if info.enabled and (validate or save or stopping):
            dist_utils.broadcast_buffers(run.model)  # rank 0's BN statistics on every rank
            dist_utils.broadcast_buffers(run.method)  # and its teacher's (model.bn: batch)
        if validate:
            logs["val_miou"] = _validate(run, it + 1)
        if save:
            _save_checkpoint(run, it + 1)
        if t.snapshot_every and (it + 1) % t.snapshot_every == 0 and info.is_main:
            save_snapshot(run.out_dir, it + 1, run.model, run.classes, run.palette)
        if stopping and not last:
            run.log.close_progress()
            _interrupted(run, it + 1, signals, save=not save)
        if on_iteration:
            on_iteration(it + 1, logs)


def _next_step(run: _Run, iteration: int, signals: _StopSignals) -> Step:
    """The next micro-step's batches, on the device, as the method's :class:`Step`."""
    t = run.cfg.train
    try:
        batch = next(run.batches)
        target = next(run.target_batches) if run.target_batches is not None else None
    except Exception:
        if signals.signum is None or run.info.enabled:
            raise
        # The signal reached a loader worker too (a process group's SIGTERM): the weights are
        # those of `iteration` finished iterations, save them (unless just saved) and stop.
        run.log.close_progress()
        _interrupted(run, iteration, signals,
                     save=iteration % t.checkpoint_every != 0 or iteration == run.start)
    images = batch["image"].to(run.device, non_blocking=True)
    labels = batch["label"].to(run.device, non_blocking=True)
    if t.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    target_labels = target_boxes = None
    if target is not None:
        if run.cfg.adapt.target_labels:
            target_labels = target["label"].to(run.device, non_blocking=True)
        target_boxes = target.get("crop_box")  # (N, 5) on the CPU: read by index only
        target = target["image"].to(run.device, non_blocking=True)
        if t.channels_last:
            target = target.contiguous(memory_format=torch.channels_last)
    return run.make_step(images=images, labels=labels, target=target, iteration=iteration,
                         target_labels=target_labels, target_boxes=target_boxes)


def _agree_to_go_on(run: _Run, loss_sum: torch.Tensor, iteration: int,
                    signals: _StopSignals) -> bool:
    """Stop every rank when the loss of any rank is NaN/inf, before the broken step is applied;
    return whether any rank was asked to stop (Ctrl-C), so that all stop after the same
    iteration. One reduction tells every rank both."""
    flags = torch.tensor([float(torch.isfinite(loss_sum)), float(signals.signum is not None)],
                         device=run.device)
    finite, stopping = dist_utils.all_reduce_sum(flags).tolist()
    if finite < run.info.world_size:
        run.log.close_progress()
        raise TrainingError(
            f"loss is {loss_sum.item()} at iteration {iteration + 1}: training stopped, weights "
            f"not updated; newest finite checkpoint: {_newest_checkpoint(run)} (try a lower "
            f"train.lr or amp=none)")
    return bool(stopping)


def _check_weights(run: _Run, loss_sum: torch.Tensor, iteration: int) -> None:
    """A finite loss can still give non-finite weights (a huge step); stop before anything is
    saved from them. Replicas are identical under DDP, so every rank agrees."""
    if not all_finite([*run.model.parameters(), *run.model.buffers()]):
        run.log.close_progress()
        raise TrainingError(
            f"weights became NaN/inf at iteration {iteration + 1} (loss {loss_sum.item():.4g}): "
            f"training stopped, nothing saved from them; newest finite checkpoint: "
            f"{_newest_checkpoint(run)} (try a lower train.lr or amp=none)")


def _newest_checkpoint(run: _Run) -> str:
    return newest_finite_checkpoint(run.out_dir / "last.pth", run.resume)


def _validate(run: _Run, iteration: int) -> float:
    """Evaluate after step ``iteration``, log it, keep ``best.pth``; return the mIoU."""
    t = run.cfg.train
    metrics = evaluate(run.model, run.val_ds, device=run.device, limit=t.val_limit or None,
                       amp=t.amp, channels_last=t.channels_last,
                       inference=run.cfg.eval.inference(), protocol=run.cfg.eval.protocol)
    run.model.train()
    run.log.validation(iteration, metrics["miou"], protocol=metrics["protocol"],
                       samples=lambda: _sample_rows(run.model, run.val_ds, run.device))
    if run.best is None or metrics["miou"] > run.best:
        run.best = metrics["miou"]
        if run.info.is_main:
            save_weights(run.model, run.out_dir / "best.pth", run.classes, run.palette)
    run.metrics = metrics
    return metrics["miou"]


def _save_checkpoint(run: _Run, iteration: int) -> None:
    """``last.pth`` and ``history.json`` at ``iteration`` done (rank 0 writes, all wait)."""
    if run.info.is_main:
        save_checkpoint(run.out_dir / "last.pth", run.model, run.optimizer, iteration,
                        run.classes, run.palette, run.run_config, run.best, run.scaler,
                        adapt_state=run.method.extra_state())
        run.log.save_history(run.out_dir / "history.json")
    dist_utils.barrier()


def _interrupted(run: _Run, done: int, signals: _StopSignals, save: bool):
    """Write ``last.pth`` at ``done`` iterations (unless just written) and stop every rank."""
    if save:
        _save_checkpoint(run, done)
    raise Interrupted(f"interrupted after iteration {done}: resumable checkpoint "
                      f"{run.out_dir / 'last.pth'} written; continue with --resume",
                      signals.signum or 2)


# -- the end --------------------------------------------------------------------------------------
def _finish(run: _Run) -> TrainResult:
    """After the last iteration: DDP replicas checked, ``model.pth`` and ``metrics.json``."""
    run.log.close()
    if run.info.enabled:
        _check_replicas(run.model, run.info, run.out_dir)
        if run.method.adapting:  # the discriminators / teacher beside the network too
            _check_replicas(run.method, run.info, run.out_dir, "replicas_adapt.json")
    if run.info.is_main:
        save_weights(run.model, run.out_dir / "model.pth", run.classes, run.palette)
        if run.metrics is not None:
            save_json(run.metrics, run.classes, run.out_dir / "metrics.json")
    dist_utils.barrier()
    return TrainResult(run.out_dir, run.stop, run.log.history, run.metrics, run.best, run.model)


def _check_replicas(module, info, out_dir: Path, name: str = "replicas.json") -> None:
    """DDP keeps replicas identical; verify it once at the end and record it in ``name``."""
    digests = dist_utils.replica_digests(module, info.world_size)
    if info.is_main:
        atomic_write_text(out_dir / name,
                          json.dumps({"world_size": info.world_size, "sha256": digests},
                                     indent=2))
    if len(set(digests)) != 1:
        raise TrainingError(f"DDP replicas diverged: weight digests {digests}")


@torch.no_grad()
def _sample_rows(model, dataset, device, count: int = 2) -> dict[str, np.ndarray]:
    """Image | ground truth | prediction rows of the first ``count`` validation images."""
    model.eval()
    palette, rows = dataset.palette, {}
    for i in range(min(count, len(dataset))):
        image, label = dataset.load(i)
        x = model.preprocess(image).to(device)
        pred = model(x).argmax(1)[0].cpu().numpy()
        rows[f"val/sample_{i}"] = np.concatenate(
            [image, colorize(label, palette), colorize(pred, palette)], axis=1)
    model.train()
    return rows
