"""The suite's runs must not depend on the machine or its load: ``train.amp: auto`` and
``--precision auto`` pick FP32 here, in this process and the ones it starts
(``tests/test_precision.py`` tests the rule itself)."""

import os

os.environ.setdefault("DEEPLABV2_AUTO_PRECISION", "fp32")
