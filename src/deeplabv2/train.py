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
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from . import distributed as dist_utils
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config, save_config
from .data import IGNORE_INDEX, build_dataset
from .data.transforms import TrainTransform
from .evaluate import evaluate
from .fileio import atomic_write_text
from .inference import autocast_context
from .metrics import save_json
from .model import MSC, DeepLabV2, build_model, get_alignment, msc_loss
from .weights import load_weights, save_weights


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss became NaN/inf); the last good checkpoint is kept."""


# -- data order ---------------------------------------------------------------------------------
class IterationBatchSampler:
    """This rank's ``(epoch, index)`` pairs for every micro-step from ``start_step`` on.

    The global sample stream is the concatenation of one permutation of the dataset per epoch,
    each drawn from ``(seed, epoch)``. Micro-step ``s`` takes the ``batch_size * world_size``
    samples at ``s * batch_size * world_size`` and rank ``r`` its ``r``-th slice, so the stream
    (and every sample's augmentation, seeded by ``(seed, epoch, index)``) is a pure function of
    the step: a resumed run continues with exactly the data an uninterrupted one would see, and
    2 processes x batch 2 see the same samples as 1 process x batch 4.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, total_steps: int,
                 start_step: int = 0, rank: int = 0, world_size: int = 1):
        if num_samples < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.batch_size, self.seed = num_samples, batch_size, seed
        self.total_steps, self.start_step = total_steps, start_step
        self.rank, self.world_size = rank, world_size
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def __len__(self) -> int:
        return self.total_steps - self.start_step

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        for step in range(self.start_step, self.total_steps):
            first = step * global_batch + self.rank * self.batch_size
            batch = []
            for pos in range(first, first + self.batch_size):
                epoch, i = divmod(pos, self.n)
                batch.append((epoch, int(self._permutation(epoch)[i])))
            yield batch


class EpochIndexed(torch.utils.data.Dataset):
    """Wraps a dataset so that ``ds[(epoch, index)]`` draws that sample's augmentation."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        image, label = self.dataset.load(index)
        rng = np.random.default_rng([self.dataset.seed, epoch, index])
        return self.transform(image, label, rng)


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
    history: list[dict] = field(default_factory=list)  # {"iteration", "loss", "lr", "time"}
    metrics: dict | None = None  # final validation metrics
    best_miou: float | None = None
    model: DeepLabV2 | None = None


def _check_dataset(ds, how: str) -> None:
    """``data.check``: read every sample ("all"), the first N, or none (emptiness is always
    an error)."""
    ds.check(limit=None if how == "all" else 0 if how == "none" else int(how))


def _build_model(cfg: Config, num_classes: int) -> DeepLabV2:
    m = cfg.model
    config = {"backbone": m.backbone, "num_classes": m.num_classes or num_classes,
              "atrous_rates": m.atrous_rates}
    if m.backbone == "resnet":
        config.update(blocks=m.blocks, width=m.width, frozen_bn=m.frozen_bn,
                      head_mode=m.head_mode)
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


def _resolve_amp(cfg: Config, device: torch.device) -> tuple[Config, str]:
    """``cfg`` with ``train.amp: auto`` replaced by the choice that is faster on ``device``
    (:func:`deeplabv2.precision.resolve_train_amp`, agreed by all ranks), and a line that
    says why; the run's ``config.yaml`` records the choice."""
    import dataclasses

    from .precision import resolve_train_amp
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
          on_iteration: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train as ``cfg`` says; resume from ``resume`` (a checkpoint path, or ``"auto"`` for
    ``out_dir/last.pth`` when it exists). ``on_iteration(iteration, logs)`` is called after each
    optimizer step. Returns a :class:`TrainResult`; artefacts are in ``cfg.train.out_dir``:
    ``config.yaml``, ``last.pth`` (training checkpoint), ``best.pth``, ``model.pth``,
    ``history.json``, ``metrics.json`` and TensorBoard logs in ``tb/``.
    """
    t, d = cfg.train, cfg.data
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
    _check_dataset(train_ds, d.check)
    _check_dataset(val_ds, d.check)
    classes, palette = list(train_ds.classes), train_ds.palette

    model = _build_model(cfg, train_ds.num_classes).to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.param_groups(t.lr, t.weight_decay), lr=t.lr,
                                momentum=t.momentum)
    scaler = torch.amp.GradScaler("cuda") if t.amp == "fp16" else None
    start, best = 0, None
    if resume == "auto":
        resume = str(out_dir / "last.pth") if (out_dir / "last.pth").is_file() else None
    if resume:
        state = load_checkpoint(resume, model, optimizer, scaler)
        start, best = int(state["iteration"]), state.get("best_miou")
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
        pin_memory=device.type == "cuda", persistent_workers=False)
    batches = iter(loader)

    writer = _tensorboard(out_dir / "tb") if (t.tensorboard and info.is_main) else None
    progress = _progress(start, t.iterations, enabled=t.progress and info.is_main)
    history: list[dict] = _read_history(out_dir) if (resume and info.is_main) else []
    ckpt_path, metrics = out_dir / "last.pth", None
    window_loss, window_start = 0.0, time.perf_counter()
    net.train()
    for it in range(start, t.iterations):
        # Random draws inside the network (VGG's dropout) are a function of (seed, iteration,
        # rank) too, so that a resumed run continues them exactly on every rank.
        torch.manual_seed((t.seed * 1_000_003 + it) * 1_009 + info.rank)
        lr = poly_lr(t.lr, it, t.iterations, t.poly_power)
        set_lr(optimizer, lr)
        loss_sum = torch.zeros((), device=device)
        for micro in range(t.accumulate):
            batch = next(batches)
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            if t.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            sync = micro == t.accumulate - 1 or not info.enabled
            with (contextlib.nullcontext() if sync else ddp.no_sync()), \
                    autocast_context(device, t.amp):
                if t.msc_scales:  # [s_1, s_0.75, s_0.5, max-fused], each vs its own labels
                    loss = msc_loss(ddp(images), labels,
                                    lambda s, y: segmentation_loss(s, y, t.loss_at, align),
                                    net.input_sizes(*images.shape[-2:]), align)
                else:
                    loss = segmentation_loss(ddp(images, upsample=False), labels, t.loss_at,
                                             align)
                loss = loss / t.accumulate
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            loss_sum += loss.detach()

        # A NaN/inf loss on any rank stops every rank before the broken step is applied.
        finite = torch.tensor([float(torch.isfinite(loss_sum))], device=device)
        if dist_utils.all_reduce_sum(finite).item() < info.world_size:
            progress.close()
            raise TrainingError(
                f"loss is {loss_sum.item()} at iteration {it + 1}: training stopped, weights "
                f"not updated; last good checkpoint: "
                f"{ckpt_path if ckpt_path.is_file() else 'none written yet'} (try a lower "
                f"train.lr or amp=none)")
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        step_loss = dist_utils.all_reduce_sum(loss_sum.clone()).item() / info.world_size
        window_loss += step_loss
        logs = {"iteration": it + 1, "loss": step_loss, "lr": lr}
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}")
        if (it + 1) % t.log_every == 0 or it + 1 == t.iterations:
            n = (it + 1 - start) % t.log_every or t.log_every
            elapsed = time.perf_counter() - window_start
            entry = {"iteration": it + 1, "loss": window_loss / n, "lr": lr,
                     "seconds_per_iteration": elapsed / n}
            history.append(entry)
            if writer:
                writer.add_scalar("train/loss", entry["loss"], it + 1)
                writer.add_scalar("train/lr", lr, it + 1)
                writer.add_scalar("train/seconds_per_iteration", entry["seconds_per_iteration"],
                                  it + 1)
            window_loss, window_start = 0.0, time.perf_counter()

        last = it + 1 == t.iterations
        if t.val_every and (it + 1) % t.val_every == 0 or last:
            metrics = evaluate(model, val_ds, device=device, limit=t.val_limit or None,
                               amp=t.amp, channels_last=t.channels_last,
                               inference=cfg.eval.inference())
            model.train()
            logs["val_miou"] = metrics["miou"]
            if writer:
                writer.add_scalar("val/mIoU", metrics["miou"], it + 1)
                _log_samples(writer, model, val_ds, device, it + 1)
            if best is None or metrics["miou"] > best:
                best = metrics["miou"]
                if info.is_main:
                    save_weights(model, out_dir / "best.pth", classes, palette)
        if (it + 1) % t.checkpoint_every == 0 or last:
            if info.is_main:
                save_checkpoint(ckpt_path, model, optimizer, it + 1, classes, palette,
                                cfg.to_dict(), best, scaler)
                _write_json(out_dir / "history.json", history)
            dist_utils.barrier()
        if on_iteration:
            on_iteration(it + 1, logs)
    progress.close()
    if writer:
        writer.close()
    if info.enabled:
        _check_replicas(model, info, out_dir)
    if info.is_main:
        save_weights(model, out_dir / "model.pth", classes, palette)
        if metrics is not None:
            save_json(metrics, classes, out_dir / "metrics.json")
    dist_utils.barrier()
    return TrainResult(out_dir, t.iterations, history, metrics, best, model)


def weights_digest(model) -> str:
    """SHA-256 of every tensor of the state dict (names and bytes): equal iff identical."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_replicas(model, info, out_dir: Path) -> None:
    """DDP keeps replicas identical; verify it once at the end and record it."""
    import torch.distributed as dist
    digests: list = [None] * info.world_size
    dist.all_gather_object(digests, weights_digest(model))
    if info.is_main:
        _write_json(out_dir / "replicas.json", {"world_size": info.world_size,
                                                "sha256": digests})
    if len(set(digests)) != 1:
        raise TrainingError(f"DDP replicas diverged: weight digests {digests}")


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a trimmed install may lack it
        print("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
        return None
    return SummaryWriter(str(path))


class _NoProgress:
    def update(self, n): pass
    def set_postfix(self, **kw): pass
    def close(self): pass


def _progress(start: int, total: int, enabled: bool):
    if not enabled:
        return _NoProgress()
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, desc="train", unit="it", dynamic_ncols=True)


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


def _read_history(out_dir: Path) -> list[dict]:
    path = out_dir / "history.json"
    return json.loads(path.read_text()) if path.is_file() else []


@torch.no_grad()
def _log_samples(writer, model, dataset, device, step: int, count: int = 2) -> None:
    """Image | ground truth | prediction rows for the first ``count`` validation images."""
    from .visualize import colorize
    model.eval()
    palette = dataset.palette
    for i in range(min(count, len(dataset))):
        image, label = dataset.load(i)
        x = model.preprocess(image).to(device)
        pred = model(x).argmax(1)[0].cpu().numpy()
        row = np.concatenate([image, colorize(label, palette), colorize(pred, palette)], axis=1)
        writer.add_image(f"val/sample_{i}", row, step, dataformats="HWC")
    model.train()
