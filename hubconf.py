"""torch.hub entry points: ``torch.hub.load("owner/deeplabv2", "deeplabv2_resnet101", ...)``
or, from a clone, ``torch.hub.load(CLONE, "deeplabv2_resnet101", source="local",
weights="model.pth", num_classes=19)``.

The builders are :mod:`deeplabv2.hub`'s: ``weights=`` takes any file
:func:`deeplabv2.load_weights` reads (ImageNet/COCO init files, foreign checkpoints, ours) or a
model folder of ``deeplabv2 export-hub``; ``from_pretrained`` rebuilds a model from one of our
checkpoints or model folders (or a Hugging Face Hub repository) without naming the architecture.
"""

import importlib as _importlib
import sys as _sys
from pathlib import Path as _Path

# the module names torch.hub checks before it imports this file (importlib.util.find_spec)
dependencies = ["torch", "numpy", "PIL", "yaml", "safetensors"]


def _import_package():
    """This clone's ``src/deeplabv2`` (a clone that was not pip-installed, as torch.hub gets it),
    else the installed package. ``src`` is on ``sys.path`` only while the package is imported:
    its modules import the rest relative to the package's own folder."""
    if "deeplabv2" in _sys.modules:
        return _sys.modules["deeplabv2"]
    src = _Path(__file__).resolve().parent / "src"
    if not (src / "deeplabv2" / "__init__.py").is_file():
        return _importlib.import_module("deeplabv2")
    _sys.path.insert(0, str(src))
    try:
        return _importlib.import_module("deeplabv2")
    finally:
        _sys.path.remove(str(src))


_deeplabv2 = _import_package()
deeplabv2_resnet101 = _deeplabv2.deeplabv2_resnet101
deeplabv2_resnet50 = _deeplabv2.deeplabv2_resnet50
deeplabv2_resnet101_v1c = _deeplabv2.deeplabv2_resnet101_v1c
deeplabv2_vgg16 = _deeplabv2.deeplabv2_vgg16
deeplabv2_vgg16_largefov = _deeplabv2.deeplabv2_vgg16_largefov
from_pretrained = _deeplabv2.from_pretrained
