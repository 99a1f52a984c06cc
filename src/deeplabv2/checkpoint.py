"""Training checkpoints: model + optimizer + iteration + RNG, written atomically.

A training checkpoint is one of this project's weight files (so ``load_model`` and
``load_weights`` read it) with three extra fields: ``optimizer_state``, ``rng_state`` and
``train_state`` (iteration, best mIoU, config), and two optional ones: ``scaler_state`` (fp16
runs: the enabled GradScaler's) and ``adapt_state`` (the adaptation method's modules and
optimizers, :meth:`~deeplabv2.adapt.methods.Method.extra_state`). The data position needs no
field: the sampler is a pure function of (seed, iteration), see
:class:`deeplabv2.data.sampler.IterationBatchSampler`.

The run folder's rules live here too: which files make a folder hold a run
(:data:`RUN_FILES`), which settings a resume may not change silently (:data:`RUN_SETTINGS`),
and which checkpoint a failed run falls back to.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .snapshots import SERIES_FILES, SNAPSHOT_DIR, list_snapshots
from .utils.digest import non_finite_keys
from .weights import WeightsError, _unwrap, load_state, save_weights, torch_load


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss became NaN/inf); the last good checkpoint is kept."""


# Files that make a folder "hold a run": training into it needs --resume or --overwrite.
RUN_FILES = ("last.pth", "best.pth", "model.pth", "history.json", "metrics.json")
# Settings that change what a run computes: a resume that changes one is refused unless asked.
RUN_SETTINGS = {
    "model": ("backbone", "blocks", "width", "num_classes", "atrous_rates", "bn",
              "head_mode", "alignment", "stem", "contract_dilation"),
    "data": ("dataset", "train_split", "crop_size", "scale_range", "scales", "flip",
             "batch_size", "options", "resize", "resize_filter", "rare_class_sampling",
             "cat_max_ratio"),
    "train": ("iterations", "lr", "momentum", "weight_decay", "poly_power", "accumulate",
              "optimizer", "param_groups", "warmup_iters", "warmup_ratio",
              "loss_at", "msc_scales", "amp", "tf32", "channels_last", "seed"),
    "adapt": ("method", "target_dataset", "target_split", "target_options", "target_crop_size",
              "target_scale_range", "multi_level", "lambda_seg_aux", "lambda_adv",
              "lambda_adv_aux", "d_lr", "lambda_ent", "lambda_ent_aux", "fda_beta",
              "fda_lambda_ent", "fda_eta", "fda_ent_start", "ema_alpha", "pseudo_threshold",
              "target_resize", "target_resize_filter", "target_labels", "pseudo_margins",
              "pseudo_margins_frame", "fdist_lambda", "fdist_classes", "fdist_min_ratio"),
}


def save_checkpoint(path, model, optimizer, iteration: int, classes, palette, config: dict,
                    best_miou: float | None = None, scaler=None,
                    adapt_state: dict | None = None) -> None:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    train_state = {"iteration": int(iteration), "best_miou": best_miou, "config": config}
    extra = {"optimizer_state": optimizer.state_dict(), "rng_state": rng,
             "train_state": train_state}
    if scaler is not None and scaler.is_enabled():  # fp16 only: a disabled one has no state
        extra["scaler_state"] = scaler.state_dict()
    if adapt_state is not None:  # a domain adaptation method's modules and optimizers
        extra["adapt_state"] = adapt_state
    save_weights(model, path, classes, palette, **extra)


def load_checkpoint(path, model, optimizer, scaler=None) -> dict:
    """Restore model, optimizer and RNG from ``path``; return its ``train_state``."""
    path = Path(path)
    obj = torch_load(path)
    state, metadata = _unwrap(obj, path)
    bad = non_finite_keys(state)
    if bad:  # never resume into NaN weights (files written by this version cannot hold them)
        raise WeightsError(f"{path}: damaged: {bad[0]} holds NaN/inf; resume from an earlier "
                           "checkpoint")
    report = load_state(model, state, metadata, source=path, head="require")
    missing = [k for k in ("optimizer_state", "rng_state", "train_state") if k not in obj]
    if missing:
        raise WeightsError(f"{path}: not a training checkpoint (no {missing[0]}); "
                           "use it as model.weights to start a new run from it")
    try:
        optimizer.load_state_dict(obj["optimizer_state"])
    except (ValueError, KeyError) as e:
        raise WeightsError(f"{path}: optimizer state does not fit this model/config ({e})") \
            from None
    torch.set_rng_state(obj["rng_state"]["torch"])
    if "cuda" in obj["rng_state"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(obj["rng_state"]["cuda"])
    if scaler is not None and scaler.is_enabled() and "scaler_state" in obj:
        scaler.load_state_dict(obj["scaler_state"])
    state = dict(obj["train_state"])
    state["load_report"] = report
    state["adapt_state"] = obj.get("adapt_state")
    return state


# -- the run folder -------------------------------------------------------------------------------
def prepare_run_folder(out_dir: Path, resume: str | None, overwrite: bool,
                       is_main: bool) -> str | None:
    """Refuse to train over a run unless asked; return the checkpoint to resume (or None)."""
    held = [n for n in RUN_FILES if (out_dir / n).exists()]
    if list_snapshots(out_dir):  # a run killed before its first last.pth may have some
        held.append(f"{SNAPSHOT_DIR}/")
    if resume is None and held and not overwrite:
        raise TrainingError(f"{out_dir}: holds a run ({', '.join(held)}); pass --resume to "
                            "continue it, --overwrite to replace it, or choose another "
                            "train.out_dir")
    if resume == "auto":
        resume = str(out_dir / "last.pth")
        if Path(resume).is_dir():
            raise TrainingError(f"{resume}: is a folder, not a checkpoint; move it away, or "
                                "give --from PATH")
        if not Path(resume).is_file():
            raise TrainingError(f"{resume}: no checkpoint to resume from (nothing was saved "
                                "there yet); start without --resume, or give --from PATH")
    if resume is None and overwrite and is_main:
        for name in held:
            if name in RUN_FILES:
                (out_dir / name).unlink()
        for name in ("replicas.json", "config.yaml", *SERIES_FILES):
            (out_dir / name).unlink(missing_ok=True)
        for folder in ("tb", SNAPSHOT_DIR):
            if (out_dir / folder).is_dir():
                shutil.rmtree(out_dir / folder)
    return resume


def changed_settings(old: dict, new: dict) -> list[str]:
    """``section.key old -> new`` for every :data:`RUN_SETTINGS` key that differs."""
    changes = []
    model = old.get("model", {})
    if "bn" not in model and model.get("frozen_bn") is not None:  # written before model.bn
        old = {**old, "model": {**model, "bn": "frozen" if model["frozen_bn"] else "train"}}
    for section, keys in RUN_SETTINGS.items():
        for key in keys:
            if key not in old.get(section, {}):  # a checkpoint older than the setting
                continue
            a, b = old[section][key], new.get(section, {}).get(key)
            if a != b:
                changes.append(f"{section}.{key} {a!r} -> {b!r}")
    if old.get("world_size", 1) != new.get("world_size", 1):  # the global batch changes
        changes.append(f"world size {old.get('world_size', 1)} -> {new.get('world_size', 1)}")
    return changes


def newest_finite_checkpoint(ckpt_path: Path, resume: str | None) -> str:
    """The checkpoint to go back to: nothing non-finite is ever saved, so the newest one."""
    if ckpt_path.is_file():
        return str(ckpt_path)
    return str(resume) if resume else "none written yet"
