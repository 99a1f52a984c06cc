"""Training checkpoints: model + optimizer + iteration + RNG, written atomically.

A training checkpoint is one of this project's weight files (so ``load_model`` and
``load_weights`` read it) with three extra fields: ``optimizer_state``, ``rng_state`` and
``train_state`` (iteration, best mIoU, config). The data position needs no field: the sampler
is a pure function of (seed, iteration), see
:class:`deeplabv2.data.sampler.IterationBatchSampler`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .utils.digest import non_finite_keys
from .weights import WeightsError, _unwrap, load_state, save_weights, torch_load


def save_checkpoint(path, model, optimizer, iteration: int, classes, palette, config: dict,
                    best_miou: float | None = None, scaler=None,
                    adapt_state: dict | None = None) -> None:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    train_state = {"iteration": int(iteration), "best_miou": best_miou, "config": config}
    extra = {"optimizer_state": optimizer.state_dict(), "rng_state": rng,
             "train_state": train_state}
    if scaler is not None:
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
    if scaler is not None and "scaler_state" in obj:
        scaler.load_state_dict(obj["scaler_state"])
    state = dict(obj["train_state"])
    state["load_report"] = report
    state["adapt_state"] = obj.get("adapt_state")
    return state
