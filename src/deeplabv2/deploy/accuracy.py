"""What each inference mode of :mod:`deeplabv2.deploy.modes` costs in accuracy against eager
FP32 on a labelled dataset (``benchmarks/accuracy.py`` writes it as a report)."""

from __future__ import annotations

import torch
from torch import nn

from ..evaluation.metrics import ConfusionMatrix
from ..inference.front import segment
from ..model.deeplab import NetworkWrapper
from .modes import Modes


class _Observed(NetworkWrapper):
    """``net`` as :func:`segment` runs it, keeping its last output: the logits the mode's
    labels came from, for the logit difference."""

    def __init__(self, net: nn.Module):
        super().__init__(net)
        self.net, self.output = net, None

    def forward(self, x: torch.Tensor, upsample: bool = True) -> torch.Tensor:
        self.output = self.net(x, upsample=upsample).float()
        return self.output


@torch.no_grad()
def mode_accuracy(model: nn.Module, dataset, modes=("fast", "bf16", "onnxruntime"), *,
                  limit: int | None = None, threads: int | None = None,
                  int8_xml=None) -> dict:
    """What each inference mode costs in accuracy, against eager FP32 on a labelled dataset.

    Every image (or the first ``limit``) is segmented (:func:`segment`, whole image at batch 1)
    by the eager FP32 model and by each of ``modes`` (names from
    :data:`deeplabv2.deploy.modes.MODES`). Per mode: the fraction of pixels whose label differs
    from eager FP32's, the mIoU and its difference from eager FP32's in points (percent), and
    the largest ``max|logits - eager| / max|eager|`` over the images. Use a trained model: an
    untrained deep network's logits are too chaotic to say anything. Mode ``int8`` runs
    ``int8_xml`` (``deeplabv2 quantize``'s file for this model).
    """
    if threads:
        torch.set_num_threads(int(threads))
    was_training = model.training
    model.eval()
    n = len(dataset) if not limit else min(limit, len(dataset))
    if n == 0:
        raise ValueError("mode_accuracy needs at least one image")
    if {"int8", "int8-f32"} & set(modes) and not int8_xml:
        raise ValueError("mode_accuracy's int8 mode needs int8_xml, the quantized model")
    prepared = Modes(model, threads=threads, int8_xml=int8_xml)
    nets = {mode: _Observed(prepared.prepare(mode)) for mode in ("eager", *modes)}
    cms = {mode: ConfusionMatrix(dataset.num_classes) for mode in nets}
    changed = {mode: 0 for mode in nets}
    worst = {mode: 0.0 for mode in nets}
    pixels = 0
    for i in range(n):
        image, label = dataset.load(i)
        target = torch.from_numpy(label.astype("int64"))[None]
        ref = None
        for mode, net in nets.items():
            pred = segment(net, image[None]).labels
            if ref is None:
                ref, ref_labels = net.output, pred
            cms[mode].update(pred, target)
            changed[mode] += int((pred != ref_labels).sum())
            worst[mode] = max(worst[mode],
                              float((net.output - ref).abs().max() / ref.abs().max()))
        pixels += ref_labels.numel()
    model.train(was_training)
    ref_miou = cms["eager"].compute()["miou"]
    out = {"images": n, "pixels": pixels, "eager_miou": ref_miou, "modes": {}}
    for mode in modes:
        miou = cms[mode].compute()["miou"]
        out["modes"][mode] = {"miou": miou, "miou_diff_points": 100 * (miou - ref_miou),
                              "labels_changed": changed[mode] / pixels,
                              "max_rel_logit_diff": worst[mode]}
    return out


def format_accuracy_table(result: dict) -> str:
    """:func:`mode_accuracy`'s result as a Markdown table."""
    lines = ["| mode | mIoU % | mIoU diff (points) | labels changed | max rel. logit diff |",
             "| --- | ---: | ---: | ---: | ---: |",
             f"| eager fp32 (reference) | {100 * result['eager_miou']:.2f} | 0 | 0 | 0 |"]
    for mode, r in result["modes"].items():
        lines.append(f"| {mode} | {100 * r['miou']:.2f} | {r['miou_diff_points']:+.3f} | "
                     f"{100 * r['labels_changed']:.3f}% | {r['max_rel_logit_diff']:.1e} |")
    return "\n".join(lines)
