"""DeepLab-ASPP over VGG-16 (paper Sec. 4, "DeepLab-ASPP-L").

Backbone: VGG-16 conv1_1 ... conv5_3 with pool1-3 at stride 2, pool4 and pool5 at stride 1
(3x3, padding 1, Caffe ceil rounding) and conv5 dilated by 2: output stride 8.
Head: per rate r in (6, 12, 18, 24) a branch fc6 (3x3, dilation r, 1024) -> ReLU -> dropout
-> fc7 (1x1, 1024) -> ReLU -> dropout -> fc8 (1x1, classes); the four fc8 scores are summed
(cf. DeepLab-v2 ``prototxt/VGG16_ASPP-L``). With ``atrous_rates=(12,)`` the head is one such
branch: DeepLab-LargeFOV (paper Sec. 4.1, Table 3).

fc6/fc7 are not new layers: DeepLab initialises them from ImageNet VGG-16's fully connected
fc6/fc7, "decimated" (paper Sec. 3.1, DeepLab v1 Sec. 4.1) to 1024 channels and a 3x3 kernel
(:func:`deeplabv2.weights.decimate_vgg_classifier`), and trains them like the backbone (lr x1 weights, x2
biases); only fc8 is new (N(0, 0.01), lr x10/x20). Dropout is Caffe's element-wise dropout.

``features`` uses the indices of torchvision's ``vgg16().features`` so that ImageNet VGG-16
state dicts load by name.
"""

from __future__ import annotations

import torch
from torch import nn

# (out_channels, dilation) per conv; "M2" pool stride 2, "M1" pool stride 1.
_CFG = [(64, 1), (64, 1), "M2", (128, 1), (128, 1), "M2", (256, 1), (256, 1), (256, 1), "M2",
        (512, 1), (512, 1), (512, 1), "M1", (512, 2), (512, 2), (512, 2), "M1"]


class VGG16(nn.Module):
    """Atrous VGG-16 returning ``(N, 512, H/8, W/8)`` features."""

    out_channels = 512

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for item in _CFG:
            if isinstance(item, str):
                layers.append(nn.MaxPool2d(3, stride=2 if item == "M2" else 1, padding=1,
                                           ceil_mode=True))
            else:
                cout, d = item
                layers += [nn.Conv2d(cin, cout, 3, padding=d, dilation=d), nn.ReLU(inplace=True)]
                cin = cout
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class VGGBranch(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, rate: int, dropout: float = 0.5):
        super().__init__()
        self.fc6 = nn.Conv2d(in_channels, 1024, 3, padding=rate, dilation=rate)
        self.fc7 = nn.Conv2d(1024, 1024, 1)
        self.fc8 = nn.Conv2d(1024, num_classes, 1)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(dropout)  # element-wise, as Caffe's Dropout layer
        nn.init.normal_(self.fc8.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc8.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.relu(self.fc6(x)))
        x = self.drop(self.relu(self.fc7(x)))
        return self.fc8(x)


class VGGASPP(nn.Module):
    """Four fc6-fc7-fc8 branches at rates 6/12/18/24, scores summed."""

    def __init__(self, in_channels: int, num_classes: int,
                 atrous_rates: tuple[int, ...] = (6, 12, 18, 24)):
        super().__init__()
        self.atrous_rates = tuple(atrous_rates)
        self.branches = nn.ModuleList(VGGBranch(in_channels, num_classes, r) for r in atrous_rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out

    def classifier_parameters(self):
        """The fc8 layers: the new, randomly initialised classifiers (lr x10 / x20); fc6/fc7
        come from ImageNet VGG-16 and train at the backbone's x1/x2."""
        for b in self.branches:
            yield from b.fc8.parameters()
