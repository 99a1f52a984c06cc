"""Model facts for ``deeplabv2 info``: parameters, FLOPs, output stride and shape."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import DeepLabV2


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """Return ``(total, trainable)`` parameter counts (frozen BN scale/shift count as total)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def model_info(model: DeepLabV2, height: int, width: int) -> dict:
    """Parameters, forward FLOPs of one ``height x width`` image, stride-8 and output shapes.

    FLOPs are counted by ``torch.utils.flop_counter`` on the meta device (no computation),
    multiply-add = 2 FLOPs, the bilinear upsampling not included.
    """
    total, trainable = count_parameters(model)
    meta = _meta_copy(model)
    x = torch.empty(1, 3, height, width, device="meta")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        logits = meta.logits(x)
    out = meta(x)
    return {"parameters": total, "trainable_parameters": trainable,
            "flops": int(counter.get_total_flops()), "output_stride": model.output_stride,
            "input_shape": [1, 3, height, width], "logits_shape": list(logits.shape),
            "output_shape": list(out.shape)}


def _meta_copy(model: DeepLabV2) -> DeepLabV2:
    from . import build_model
    with torch.device("meta"):
        meta = build_model(model.config)
    if hasattr(meta.backbone, "set_layout"):
        meta.backbone.set_layout(model.layout)
    return meta.eval()
