"""DeepLab v2 (Chen et al., TPAMI 2018): atrous ResNet-101/VGG-16, ASPP, frozen BN, strict weights."""

from .hub import (from_pretrained, deeplabv2_resnet50, deeplabv2_resnet101, deeplabv2_resnet101_v1c,
                  deeplabv2_vgg16, deeplabv2_vgg16_largefov)
from .model import DeepLabV2, FrozenBatchNorm2d, build_model
from .model.preprocessing import CAFFE_BGR, MMSEG_RGB, TORCHVISION_RGB, Preprocessing
from .weights import LoadReport, WeightsError, load_model, load_weights, save_weights

from .utils import moved as _moved

__version__ = "0.1.0"

# Module paths of the flat layout that users import today (``from deeplabv2.fast import
# optimize_for_inference``): the module now lives in the folder named here.
_moved.install(__name__, {
    "fast": "deploy.fast", "atrous": "deploy.atrous", "export": "deploy.export",
    "bench": "deploy.bench", "crf": "inference.crf", "ensemble": "inference.ensemble",
    "predict": "inference.predict", "evaluate": "evaluation.evaluate",
    "metrics": "evaluation.metrics", "score": "evaluation.score",
    "preprocessing": "model.preprocessing", "info": "model.info", "report": "demo.charts",
    "colour_baseline": "demo.colour_baseline", "adapt.demo": "demo.adapt",
    "fileio": "utils.fileio", "digest": "utils.digest", "distributed": "utils.distributed",
    "visualize": "utils.visualize",
})

__all__ = ["DeepLabV2", "FrozenBatchNorm2d", "build_model", "deeplabv2_resnet50",
           "deeplabv2_resnet101", "deeplabv2_resnet101_v1c", "deeplabv2_vgg16",
           "deeplabv2_vgg16_largefov", "Preprocessing", "CAFFE_BGR", "TORCHVISION_RGB",
           "MMSEG_RGB", "LoadReport", "WeightsError", "load_model", "load_weights",
           "save_weights", "from_pretrained"]
