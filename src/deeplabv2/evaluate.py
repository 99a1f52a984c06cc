"""Evaluation: run a model over a split and accumulate the confusion matrix (DDP-aware)."""

from __future__ import annotations

import torch

from . import distributed as dist_utils
from .inference import InferenceConfig
from .metrics import ConfusionMatrix


class _Raw(torch.utils.data.Dataset):
    """Raw ``(image, label)`` of a subset of indices, decoded in DataLoader workers."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        image, label = self.dataset.load(self.indices[i])
        return torch.from_numpy(image.copy()), torch.from_numpy(label.astype("int64"))


@torch.no_grad()
def evaluate(model, dataset, *, device=None, limit: int | None = None, amp: str = "none",
             channels_last: bool = False, num_workers: int = 0, predict=None,
             inference: InferenceConfig | None = None, progress: bool = False) -> dict:
    """Metrics of ``model`` on ``dataset`` (every image, or the first ``limit``).

    Under DDP each rank evaluates every ``world_size``-th image and the confusion matrices are
    summed, so every rank returns the metrics of the whole split. ``inference`` chooses whole
    image, sliding window, multi-scale and flip (default: whole image); ``predict(model, x)``
    may replace it altogether (it must return ``(N, C, H, W)`` probabilities). Returns
    :meth:`ConfusionMatrix.compute`'s dict plus ``"confusion"`` (the ``(C, C)`` counts).
    """
    device = torch.device(device or next(model.parameters()).device)
    info_rank, world = dist_utils.rank_and_world()
    n = len(dataset) if not limit else min(limit, len(dataset))
    cm = ConfusionMatrix(dataset.num_classes, device=device)
    loader = torch.utils.data.DataLoader(_Raw(dataset, range(info_rank, n, world)),
                                         batch_size=1, num_workers=num_workers)
    if progress and info_rank == 0:
        from tqdm.auto import tqdm
        loader = tqdm(loader, desc="evaluate", unit="img", dynamic_ncols=True)
    was_training = model.training
    model.eval()
    for image, label in loader:
        x = model.preprocess(image).to(device)
        if predict is not None:
            probs = predict(model, x)
        else:
            probs = (inference or InferenceConfig())(model, x, amp=amp,
                                                     channels_last=channels_last)
        cm.update(probs.argmax(1), label.to(device))
    model.train(was_training)
    cm.reduce_()
    results = cm.compute()
    results["confusion"] = cm.matrix.cpu().tolist()
    return results
