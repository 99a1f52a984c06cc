"""Model facts for ``deeplabv2 info``: parameters, FLOPs, output stride and shape."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .deeplab import DeepLabV2, build_model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """Return ``(total, trainable)`` parameter counts (frozen BN scale/shift count as total)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def forward_flops(model: DeepLabV2, height: int, width: int, batch: int = 1) -> int:
    """FLOPs of one forward pass of a ``batch x 3 x height x width`` input (multiply-add = 2).

    Counted by ``torch.utils.flop_counter`` on a copy built on the meta device (no weights, no
    computation): convolutions and matrix products only, the bilinear upsampling and the
    elementwise operations not included.
    """
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        _meta_copy(model).logits(torch.empty(batch, 3, height, width, device="meta"))
    return int(counter.get_total_flops())


def model_info(model: DeepLabV2, height: int, width: int) -> dict:
    """Parameters, forward FLOPs of one ``height x width`` image (:func:`forward_flops`),
    stride-8 and output shapes."""
    total, trainable = count_parameters(model)
    meta = _meta_copy(model)
    x = torch.empty(1, 3, height, width, device="meta")
    with torch.no_grad():
        logits, out = meta.logits(x), meta(x)
    return {"parameters": total, "trainable_parameters": trainable,
            "flops": forward_flops(model, height, width), "output_stride": model.output_stride,
            "input_shape": [1, 3, height, width], "logits_shape": list(logits.shape),
            "output_shape": list(out.shape)}


def _meta_copy(model: DeepLabV2) -> DeepLabV2:
    with torch.device("meta"):
        meta = build_model(model.config)
    if hasattr(meta.backbone, "set_layout"):
        meta.backbone.set_layout(model.layout)
    return meta.eval()
