from .aspp import ASPP
from .msc import MSC, msc_loss
from .deeplab import (DeepLabV2, build_model, deeplabv2_resnet50, deeplabv2_resnet101,
                      deeplabv2_vgg16)
from .resnet import Bottleneck, FrozenBatchNorm2d, ResNet
from .vgg import VGG16, VGGASPP

__all__ = ["MSC", "msc_loss", "ASPP", "DeepLabV2", "build_model", "deeplabv2_resnet50", "deeplabv2_resnet101",
           "deeplabv2_vgg16", "Bottleneck", "FrozenBatchNorm2d", "ResNet", "VGG16", "VGGASPP"]
