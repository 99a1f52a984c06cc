"""The DeepLab v2 network and nothing else: backbones, ASPP head, MSC, the alignment and
preprocessing conventions. Imports nothing from the rest of the package; the builders with
``weights=`` are in :mod:`deeplabv2.hub`."""

from .alignment import ALIGNMENTS, Alignment, get_alignment
from .aspp import ASPP, HEAD_MODES
from .msc import MSC, msc_loss
from .deeplab import DeepLabV2, build_model
from .resnet import Bottleneck, FrozenBatchNorm2d, ResNet
from .vgg import VGG16, VGGASPP

__all__ = ["ALIGNMENTS", "Alignment", "get_alignment", "ASPP", "HEAD_MODES", "MSC", "msc_loss",
           "DeepLabV2", "build_model", "Bottleneck", "FrozenBatchNorm2d",
           "ResNet", "VGG16", "VGGASPP"]
