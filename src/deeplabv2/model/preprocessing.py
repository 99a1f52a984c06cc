"""Input preprocessing that travels with the weights.

The Caffe-converted DeepLab files expect BGR in 0-255 minus the ImageNet mean pixel
(104.008, 116.669, 122.675) and no std (cf. DeepLab-v2 ``train.prototxt``, ``mean_value``);
torchvision/timm ResNets expect RGB in [0, 1] normalised by the ImageNet mean/std; mmcv/mmseg
weights (ResNetV1c, DAFormer/HRDA/MIC checkpoints) the same mean/std scaled to 0-255.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB ``uint8`` image becomes the network input: ``((img[order] / scale) - mean) / std``.

    ``mean`` and ``std`` are given in the *network's* channel order.
    """

    channel_order: str  # "BGR" or "RGB": the order the network expects
    scale: float  # 1.0 for 0-255 inputs, 255.0 for [0, 1] inputs
    mean: tuple[float, float, float]
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self):
        if self.channel_order not in ("BGR", "RGB"):
            raise ValueError(f"channel_order must be 'BGR' or 'RGB', got {self.channel_order!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values, std > 0; got {self.mean}, {self.std}")

    # -- conversions -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        unknown = set(d) - {"channel_order", "scale", "mean", "std"}
        if unknown:
            raise ValueError(f"unknown preprocessing keys {sorted(unknown)}")
        return cls(d["channel_order"], float(d["scale"]), tuple(map(float, d["mean"])),
                   tuple(map(float, d.get("std", (1.0, 1.0, 1.0)))))

    def mean_pixel_rgb_uint8(self) -> tuple[int, int, int]:
        """The mean as an RGB 0-255 pixel: what padding an image with "mean" means."""
        m = np.asarray(self.mean, dtype=np.float64) * self.scale
        if self.channel_order == "BGR":
            m = m[::-1]
        return tuple(int(round(float(v))) for v in np.clip(m, 0, 255))

    # -- the one call -----------------------------------------------------------------------
    def __call__(self, images) -> torch.Tensor:
        """RGB ``uint8`` image(s) -> float network input.

        Accepts ``(H, W, 3)`` or ``(N, H, W, 3)`` as a numpy array or tensor; returns a
        ``float32`` ``(N, 3, H, W)`` tensor (on the input's device for a tensor).
        """
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8:
            raise TypeError(f"expected an RGB uint8 image, got dtype {x.dtype}")
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected (H, W, 3) or (N, H, W, 3) RGB, got shape {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float()
        if self.channel_order == "BGR":
            x = x.flip(1)
        return normalize(x, self)


def normalize(x: torch.Tensor, p: Preprocessing) -> torch.Tensor:
    """Normalise an ``(N, 3, H, W)`` float tensor already in the network's channel order, 0-255."""
    mean = torch.tensor(p.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(p.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x / p.scale - mean) / std


CAFFE_BGR = Preprocessing("BGR", 1.0, (104.008, 116.669, 122.675))
TORCHVISION_RGB = Preprocessing("RGB", 255.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
#: mmcv/mmseg's ``img_norm_cfg`` (``mean=[123.675, 116.28, 103.53], std=[58.395, 57.12,
#: 57.375], to_rgb=True``, e.g. lhoyer/DAFormer ``configs/_base_/datasets/
#: uda_gta_to_cityscapes_512x512.py``): the ImageNet mean/std of :data:`TORCHVISION_RGB` times
#: 255, applied to 0-255 RGB as ``mmcv.imnormalize`` does (the same function; this form rounds
#: as theirs).
MMSEG_RGB = Preprocessing("RGB", 1.0, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))


def to_rgb(x: torch.Tensor, p: Preprocessing) -> torch.Tensor:
    """The inverse of preprocessing: network input ``(N, 3, H, W)`` -> RGB 0-255 float (what
    image-space augmentations such as FDA's spectrum swap and colour jitter work on)."""
    mean = torch.tensor(p.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(p.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = (x * std + mean) * p.scale
    return x.flip(1) if p.channel_order == "BGR" else x


def from_rgb(x: torch.Tensor, p: Preprocessing) -> torch.Tensor:
    """RGB 0-255 float ``(N, 3, H, W)`` -> network input (``p`` applied to a float image)."""
    return normalize(x.flip(1) if p.channel_order == "BGR" else x, p)
