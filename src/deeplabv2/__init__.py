"""DeepLab v2 (Chen et al., TPAMI 2018): atrous ResNet-101/VGG-16, ASPP, frozen BN, strict weights."""

from .model import (DeepLabV2, FrozenBatchNorm2d, build_model, deeplabv2_resnet50,
                    deeplabv2_resnet101, deeplabv2_vgg16, deeplabv2_vgg16_largefov)
from .preprocessing import CAFFE_BGR, TORCHVISION_RGB, Preprocessing
from .weights import LoadReport, WeightsError, load_model, load_weights, save_weights

__version__ = "0.1.0"

__all__ = ["DeepLabV2", "FrozenBatchNorm2d", "build_model", "deeplabv2_resnet50",
           "deeplabv2_resnet101", "deeplabv2_vgg16", "deeplabv2_vgg16_largefov", "Preprocessing", "CAFFE_BGR",
           "TORCHVISION_RGB", "LoadReport", "WeightsError", "load_model", "load_weights",
           "save_weights"]
