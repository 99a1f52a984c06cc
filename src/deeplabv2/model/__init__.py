from .alignment import ALIGNMENTS, Alignment, get_alignment
from .aspp import ASPP, HEAD_MODES
from .msc import MSC, msc_loss
from .deeplab import (DeepLabV2, build_model, deeplabv2_resnet50, deeplabv2_resnet101,
                      deeplabv2_vgg16, deeplabv2_vgg16_largefov)
from .resnet import Bottleneck, FrozenBatchNorm2d, ResNet
from .vgg import VGG16, VGGASPP, decimate_vgg_classifier

__all__ = ["ALIGNMENTS", "Alignment", "get_alignment", "ASPP", "HEAD_MODES", "MSC", "msc_loss",
           "DeepLabV2", "build_model", "deeplabv2_resnet50", "deeplabv2_resnet101",
           "deeplabv2_vgg16", "deeplabv2_vgg16_largefov", "Bottleneck", "FrozenBatchNorm2d",
           "ResNet", "VGG16", "VGGASPP", "decimate_vgg_classifier"]
