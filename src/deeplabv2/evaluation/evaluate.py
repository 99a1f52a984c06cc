"""Evaluation: run a model over a split and accumulate the confusion matrix (DDP-aware)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..utils import distributed as dist_utils
from ..inference.front import InferenceConfig, segment
from .metrics import ConfusionMatrix, add_subset_mious
from .protocols import Protocol, describe, get_protocol


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
             channels_last: bool = False, num_workers: int = 0,
             inference: InferenceConfig | None = None, crf=None,
             progress: bool = False, on_image=None,
             protocol: Protocol | str | None = None) -> dict:
    """Metrics of ``model`` on ``dataset`` (every image, or the first ``limit``).

    Under DDP each rank evaluates every ``world_size``-th image and the confusion matrices are
    summed, so every rank returns the metrics of the whole split. Each image is segmented by
    :func:`deeplabv2.inference.front.segment`: ``inference`` chooses whole image, sliding
    window, multi-scale and flip (default: whole image), ``crf`` (a
    :class:`deeplabv2.inference.crf.DenseCRF`) refines the probabilities with the image. Returns
    :meth:`ConfusionMatrix.compute`'s dict plus ``"confusion"`` (the ``(C, C)`` counts).

    ``on_image(index, image, label, pred, pred_before_crf)``, when given, sees every image this
    rank evaluates as NumPy arrays: RGB ``uint8 (H, W, 3)``, labels ``(H, W)`` (255 = ignore),
    predicted classes ``(H, W)``, and the prediction before the CRF (None without a CRF); the
    evaluation report (:class:`deeplabv2.app.report.ReportCollector`) is built this way.

    ``protocol`` (a :class:`deeplabv2.evaluation.protocols.Protocol` or its name) evaluates as
    a paper's released script does instead (image and labels resized by PIL, stride-8 output
    upsampled to the labels); it replaces ``inference`` and cannot be combined with a
    test-time mode or the CRF. ``on_image`` then sees the labels at the protocol's size and
    the image resized to them. The results record it as ``"protocol"`` (``{"name": "none"}``
    without one).
    """
    protocol = get_protocol(protocol)
    if protocol is not None and (crf is not None or (inference is not None
                                                     and inference != InferenceConfig())):
        raise ValueError(f"eval.protocol {protocol.name!r} fixes how images are run; it "
                         f"cannot be combined with a test-time mode "
                         f"({(inference or InferenceConfig()).describe()}) or the dense CRF")
    device = torch.device(device or next(model.parameters()).device)
    info_rank, world = dist_utils.rank_and_world()
    n = len(dataset) if not limit else min(limit, len(dataset))
    cm = ConfusionMatrix(dataset.num_classes, device=device)
    loader = torch.utils.data.DataLoader(_Raw(dataset, range(info_rank, n, world)),
                                         batch_size=1, num_workers=num_workers)
    if progress and info_rank == 0:
        from tqdm.auto import tqdm  # only when a bar is shown (70 ms of start-up)
        loader = tqdm(loader, desc="evaluate", unit="img", dynamic_ncols=True)
    was_training = model.training
    model.eval()
    indices = iter(range(info_rank, n, world))  # the dataset index of each image, for on_image
    for image, label in loader:
        if protocol is not None:
            _protocol_image(protocol, model, image[0].numpy(), label[0].numpy(), cm, device,
                            amp, channels_last, on_image, indices)
            continue
        seg = segment(model, image, inference, device=device, amp=amp,
                      channels_last=channels_last, crf=crf)
        cm.update(seg.labels, label.to(device))
        if on_image is not None:
            on_image(next(indices), image[0].numpy(), label[0].numpy(),
                     seg.labels[0].cpu().numpy(),
                     None if crf is None else seg.network_probs.argmax(1)[0].cpu().numpy())
    model.train(was_training)
    cm.reduce_()
    results = add_subset_mious(cm.compute(), dataset)
    if protocol is not None:
        protocol.subset_mious(results, dataset.num_classes)
    results["confusion"] = cm.matrix.cpu().tolist()
    results["protocol"] = describe(protocol)
    return results


def _protocol_image(protocol, model, image, label, cm, device, amp, channels_last, on_image,
                    indices) -> None:
    """One image scored by ``protocol`` (see :mod:`deeplabv2.evaluation.protocols`)."""
    if label.min() < 0 or label.max() > 255:
        raise ValueError(f"labels must lie in 0..255 to be resized, got "
                         f"{label.min()}..{label.max()}")
    label = protocol.resize_label(label.astype(np.uint8))
    pred = protocol.predict(model, image, label.shape, device=device, amp=amp,
                            channels_last=channels_last)
    cm.update(pred[None], torch.from_numpy(label.astype("int64")).to(device)[None])
    if on_image is not None:
        shown = image if image.shape[:2] == label.shape else np.asarray(
            Image.fromarray(image).resize((label.shape[1], label.shape[0]), Image.BILINEAR))
        on_image(next(indices), shown, label, pred.cpu().numpy(), None)


@torch.no_grad()
def crf_search(model, dataset, grid: list, *, device=None, limit: int | None = None,
               inference: InferenceConfig | None = None, amp: str = "none",
               progress: bool = False) -> list[dict]:
    """The paper's CRF grid search (Sec. 4.1): mIoU of each :class:`DenseCRF` in ``grid`` on
    the first ``limit`` images (and of no CRF, as ``None``), computing the network's
    probabilities once per image. Returns ``[{"crf": params or None, "miou", ...}]``."""
    device = torch.device(device or next(model.parameters()).device)
    n = len(dataset) if not limit else min(limit, len(dataset))
    settings = [None, *grid]
    matrices = [ConfusionMatrix(dataset.num_classes, device=device) for _ in settings]
    indices = range(n)
    if progress:
        from tqdm.auto import tqdm  # only when a bar is shown (70 ms of start-up)
        indices = tqdm(indices, desc="crf-search", unit="img", dynamic_ncols=True)
    model.eval()
    for i in indices:
        image, label = dataset.load(i)
        seg = segment(model, image[None], inference, device=device, amp=amp)
        target = torch.from_numpy(label.astype("int64")).to(device)[None]
        rgb = torch.from_numpy(image).to(device)[None]
        for crf, cm in zip(settings, matrices):
            cm.update(seg.refined(crf, rgb).labels, target)
    results = []
    for crf, cm in zip(settings, matrices):
        r = cm.compute()
        results.append({"crf": None if crf is None else crf.to_dict(), "miou": r["miou"],
                        "pixel_accuracy": r["pixel_accuracy"]})
    return results
