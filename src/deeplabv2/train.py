"""The training loop, readable top to bottom: :func:`train` does everything ``deeplabv2 train`` does.

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
import json
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from .utils import distributed as dist_utils
from .checkpoint import (TrainingError, changed_settings, load_checkpoint,
                         newest_finite_checkpoint, prepare_run_folder, save_checkpoint)
from .config import Config, save_config
from .data import IGNORE_INDEX, build_dataset
from .data.sampler import EpochIndexed, IterationBatchSampler
from .data.transforms import TrainTransform
from .utils.digest import all_finite
from .evaluation.evaluate import evaluate
from .utils.fileio import RunLock, atomic_write_text, remove_stale_tmp
from .utils.logger import TrainLog, read_history
from .utils.visualize import colorize
from .evaluation.metrics import save_json
from .adapt.methods import Step, build_method
from .model import MSC, DeepLabV2, build_model, get_alignment, msc_loss
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
        "(with model.frozen_bn=false; far lower mIoU)")


def _build_model(cfg: Config, num_classes: int) -> DeepLabV2:
    m = cfg.model
    config = {"backbone": m.backbone, "num_classes": m.num_classes or num_classes,
              "atrous_rates": m.atrous_rates}
    if m.backbone == "resnet":
        config.update(blocks=m.blocks, width=m.width, frozen_bn=m.frozen_bn,
                      head_mode=m.head_mode, aux_head=cfg.adapt.multi_level)
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


def _resolve_amp(cfg: Config, device: torch.device) -> tuple[Config, str]:
    """``cfg`` with ``train.amp: auto`` replaced by the choice that is faster on ``device``
    (:func:`deeplabv2.precision.resolve_train_amp`, agreed by all ranks), and a line that
    says why; the run's ``config.yaml`` records the choice."""
    amp, channels_last, why = resolve_train_amp(cfg.train.amp, cfg.train.channels_last, device)
    if cfg.train.amp == "auto":  # every rank runs as the slowest one's probe says
        votes = dist_utils.all_reduce_sum(torch.tensor([float(amp == "bf16"), 1.0],
                                                       device=device))
        if votes[0] < votes[1]:
            amp, channels_last = "none", cfg.train.channels_last
            why += "; another rank measured FP32 faster: FP32 on every rank"
    train_cfg = dataclasses.replace(cfg.train, amp=amp, channels_last=channels_last)
    return dataclasses.replace(cfg, train=train_cfg), why


# -- the loop -----------------------------------------------------------------------------------
def train(cfg: Config, resume: str | None = None,
          on_iteration: Callable[[int, dict], None] | None = None, *,
          overwrite: bool = False, allow_changes: bool = False) -> TrainResult:
    """Train as ``cfg`` says; resume from ``resume`` (a checkpoint path, or ``"auto"`` for
    ``out_dir/last.pth``, an error when it does not exist). ``on_iteration(iteration, logs)`` is
    called after each optimizer step. Returns a :class:`TrainResult`; artefacts are in
    ``cfg.train.out_dir``: ``config.yaml``, ``last.pth`` (training checkpoint), ``best.pth``,
    ``model.pth``, ``history.json``, ``metrics.json`` and TensorBoard logs in ``tb/``.

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
            for p in remove_stale_tmp(out_dir):
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
           signals: "_StopSignals") -> TrainResult:
    t, d = cfg.train, cfg.data
    _require_init_weights(cfg.model.weights, resume)
    if t.threads:
        torch.set_num_threads(t.threads)
    device = dist_utils.pick_device(t.device)
    info = dist_utils.init_distributed(device)
    cfg, amp_choice = _resolve_amp(cfg, device)
    t = cfg.train
    autocast_context(device, t.amp)  # fails now, not at the first step, for fp16 on a CPU
    out_dir = Path(t.out_dir)
    torch.manual_seed(t.seed + info.rank)

    # Data: checked up front so that a bad file fails now, not hours into the run.
    train_ds = build_dataset(d.dataset, d.root, d.train_split, seed=t.seed, **d.options)
    val_ds = build_dataset(d.dataset, d.root, d.val_split, seed=t.seed, **d.options)
    a = cfg.adapt
    adapting = a.method not in ("none", "source_only")
    if adapting:  # unlabelled target images; validation on the target's labelled split
        target_ds = build_dataset(a.target_dataset, a.target_root, a.target_split,
                                  seed=t.seed + 1, **a.target_options)
        _check_dataset(target_ds, d.check)
    if a.method != "none" and a.target_val_split:
        val_ds = build_dataset(a.target_dataset, a.target_root, a.target_val_split,
                               seed=t.seed, **a.target_val_options)
    _check_dataset(train_ds, d.check)
    _check_dataset(val_ds, d.check)
    classes, palette = list(train_ds.classes), train_ds.palette

    model = _build_model(cfg, train_ds.num_classes).to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.param_groups(t.lr, t.weight_decay), lr=t.lr,
                                momentum=t.momentum)
    method = build_method(a, model).to(device)  # plain supervised training is one too
    dist_utils.broadcast_module(method)  # one initialisation on every rank, as DDP's
    # One micro-step for every precision: unless fp16, the scaler is disabled (scale() and
    # update() pass through, step() is optimizer.step()) and has no state to checkpoint.
    scaler = torch.amp.GradScaler(device.type, enabled=t.amp == "fp16")
    start, best = 0, None
    if resume:
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
            raise TrainingError(f"{resume}: no state of adapt.method={a.method} to resume "
                                "(the checkpoint comes from another kind of run)")
        method.load_extra_state(state.get("adapt_state"))
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        if t.progress:
            print(amp_choice)

    # The optimizer, checkpoints and evaluation use the plain model; MSC only wraps the forward.
    net = MSC(model, t.msc_scales) if t.msc_scales else model
    align = model.alignment
    ddp = net
    if info.enabled:
        ddp = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)

    transform = TrainTransform(crop_size=tuple(d.crop_size), scale_range=tuple(d.scale_range),
                               scales=d.scales,
                               flip=d.flip, preprocessing=model.preprocessing)
    sampler = IterationBatchSampler(len(train_ds), d.batch_size, t.seed,
                                    total_steps=t.iterations * t.accumulate,
                                    start_step=start * t.accumulate, rank=info.rank,
                                    world_size=info.world_size)
    loader = torch.utils.data.DataLoader(
        EpochIndexed(train_ds, transform), batch_sampler=sampler, num_workers=d.num_workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
        worker_init_fn=_ignore_sigint if d.num_workers else None)
    batches = iter(loader)
    target_batches = None
    if method.needs_target:  # its own order, a function of the step
        target_transform = TrainTransform(
            crop_size=tuple(a.target_crop_size or d.crop_size),
            scale_range=tuple(a.target_scale_range), flip=d.flip,
            preprocessing=model.preprocessing)
        target_batches = iter(torch.utils.data.DataLoader(
            EpochIndexed(target_ds, target_transform),
            batch_sampler=IterationBatchSampler(
                len(target_ds), d.batch_size, t.seed + 1, total_steps=t.iterations * t.accumulate,
                start_step=start * t.accumulate, rank=info.rank, world_size=info.world_size),
            num_workers=d.num_workers, pin_memory=device.type == "cuda"))

    def seg(scores, y):
        return segmentation_loss(scores, y, t.loss_at, align)

    def source_msc_loss(outputs, y):  # [s_1, s_0.75, s_0.5, max-fused], each vs its own labels
        return msc_loss(outputs, y, seg, net.input_sizes(*y.shape[-2:]), align)

    stop = t.stop_at or t.iterations  # the poly schedule runs over t.iterations regardless
    history = read_history(out_dir / "history.json") if (resume and info.is_main) else []
    log = TrainLog(start, stop, t.log_every, history, progress=t.progress and info.is_main,
                   tensorboard=out_dir / "tb" if (t.tensorboard and info.is_main) else None)
    ckpt_path, metrics = out_dir / "last.pth", None
    run_config = {**cfg.to_dict(), "world_size": info.world_size}  # recorded in checkpoints
    net.train()
    done = start  # iterations whose update is applied

    def _interrupted(save: bool):
        """Write last.pth at ``done`` iterations (unless just written) and stop every rank."""
        if save:
            if info.is_main:
                save_checkpoint(ckpt_path, model, optimizer, done, classes, palette,
                                run_config, best, scaler, adapt_state=method.extra_state())
                log.save_history(out_dir / "history.json")
            dist_utils.barrier()
        raise Interrupted(f"interrupted after iteration {done}: resumable checkpoint "
                          f"{ckpt_path} written; continue with --resume", signals.signum or 2)

    signals.install()  # from here on, Ctrl-C finishes the iteration and saves (see _StopSignals)
    for it in range(start, stop):
        # Random draws inside the network (VGG's dropout) are a function of (seed, iteration,
        # rank) too, so that a resumed run continues them exactly on every rank.
        torch.manual_seed((t.seed * 1_000_003 + it) * 1_009 + info.rank)
        lr = poly_lr(t.lr, it, t.iterations, t.poly_power)
        set_lr(optimizer, lr)
        method.set_lr(lambda base_lr: poly_lr(base_lr, it, t.iterations, t.poly_power))
        loss_sum = torch.zeros((), device=device)
        for micro in range(t.accumulate):
            try:
                batch = next(batches)
            except Exception:
                if signals.signum is None or info.enabled:
                    raise
                # The signal reached a loader worker too (a process group's SIGTERM): the
                # weights are those of `it` finished iterations, save them and stop.
                log.close_progress()
                _interrupted(save=it % t.checkpoint_every != 0 or it == start)
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            if t.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            target = None
            if target_batches is not None:
                target = next(target_batches)["image"].to(device, non_blocking=True)
                if t.channels_last:
                    target = target.contiguous(memory_format=torch.channels_last)
            step = Step(ddp, model, images, labels, target, it, seg,
                        source_msc_loss if t.msc_scales else None)
            passes = method.passes(it)
            for k in range(passes):
                # DDP averages the gradients in the iteration's last backward; the others only
                # accumulate them on each rank.
                sync = (micro == t.accumulate - 1 and k == passes - 1) or not info.enabled
                with (contextlib.nullcontext() if sync else ddp.no_sync()):
                    with autocast_context(device, t.amp):
                        loss = method.loss(step, k) / t.accumulate
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            method.discriminator_backward(t.accumulate)

        # A NaN/inf loss on any rank stops every rank before the broken step is applied. The
        # same reduction tells every rank whether any of them was asked to stop (Ctrl-C), so
        # that all stop after the same iteration.
        flags = torch.tensor([float(torch.isfinite(loss_sum)),
                              float(signals.signum is not None)], device=device)
        finite, stopping = dist_utils.all_reduce_sum(flags).tolist()
        good = newest_finite_checkpoint(ckpt_path, resume)
        if finite < info.world_size:
            log.close_progress()
            raise TrainingError(
                f"loss is {loss_sum.item()} at iteration {it + 1}: training stopped, weights "
                f"not updated; newest finite checkpoint: {good} (try a lower "
                f"train.lr or amp=none)")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        method.step_optimizers()  # the method's own modules (discriminators)
        method.after_step(model, it)
        # A finite loss can still give non-finite weights (a huge step); stop before anything
        # is saved from them. Replicas are identical under DDP, so every rank agrees.
        if not all_finite([*model.parameters(), *model.buffers()]):
            log.close_progress()
            raise TrainingError(
                f"weights became NaN/inf at iteration {it + 1} (loss {loss_sum.item():.4g}): "
                f"training stopped, nothing saved from them; newest finite checkpoint: {good} "
                f"(try a lower train.lr or amp=none)")
        done = it + 1

        step_loss = dist_utils.all_reduce_sum(loss_sum.clone()).item() / info.world_size
        scalars = method.scalars()
        logs = {"iteration": it + 1, "loss": step_loss, "lr": lr, **scalars}
        log.iteration(it + 1, step_loss, lr, scalars)

        last = it + 1 == stop
        if info.enabled and ((t.val_every and (it + 1) % t.val_every == 0) or last or
                             (it + 1) % t.checkpoint_every == 0 or stopping):
            dist_utils.broadcast_buffers(model)
        if t.val_every and (it + 1) % t.val_every == 0 or last:
            metrics = evaluate(model, val_ds, device=device, limit=t.val_limit or None,
                               amp=t.amp, channels_last=t.channels_last,
                               inference=cfg.eval.inference())
            model.train()
            logs["val_miou"] = metrics["miou"]
            log.validation(it + 1, metrics["miou"],
                           samples=lambda: _sample_rows(model, val_ds, device))
            if best is None or metrics["miou"] > best:
                best = metrics["miou"]
                if info.is_main:
                    save_weights(model, out_dir / "best.pth", classes, palette)
        if (it + 1) % t.checkpoint_every == 0 or last:
            if info.is_main:
                save_checkpoint(ckpt_path, model, optimizer, it + 1, classes, palette,
                                run_config, best, scaler, adapt_state=method.extra_state())
                log.save_history(out_dir / "history.json")
            dist_utils.barrier()
        if stopping and not last:
            log.close_progress()
            _interrupted(save=(it + 1) % t.checkpoint_every != 0)  # else just written
        if on_iteration:
            on_iteration(it + 1, logs)
    log.close()
    if info.enabled:
        _check_replicas(model, info, out_dir)
        if method.adapting:  # the discriminators / teacher beside the network too
            _check_replicas(method, info, out_dir, "replicas_adapt.json")
    if info.is_main:
        save_weights(model, out_dir / "model.pth", classes, palette)
        if metrics is not None:
            save_json(metrics, classes, out_dir / "metrics.json")
    dist_utils.barrier()
    return TrainResult(out_dir, stop, log.history, metrics, best, model)


def _check_replicas(model, info, out_dir: Path, name: str = "replicas.json") -> None:
    """DDP keeps replicas identical; verify it once at the end and record it in ``name``."""
    digests = dist_utils.replica_digests(model, info.world_size)
    if info.is_main:
        _write_json(out_dir / name, {"world_size": info.world_size, "sha256": digests})
    if len(set(digests)) != 1:
        raise TrainingError(f"DDP replicas diverged: weight digests {digests}")


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


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
