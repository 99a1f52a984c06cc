"""The optional packages that reference tests need, imported through :func:`require`.

They are pip extras of the project ('export': onnx, onnxruntime; 'serve': starlette; 'openvino':
openvino, nncf) and the references the 'test' extra adds (pydensecrf2, cityscapesscripts).
:func:`require` is ``pytest.importorskip`` for them: without the package the test is skipped,
saying what installs it. With ``DEEPLABV2_REQUIRE_EXTRAS=1`` the test fails instead: ``make
test`` installs every extra and sets it, so that a reference test cannot silently stop running
there. What pip cannot install stays a plain skip: a CUDA device, NNPACK in this torch build,
the Chromium browser of ``tests/test_browser.py`` (a system package).
"""

from __future__ import annotations

import importlib
import os

import pytest

ENV = "DEEPLABV2_REQUIRE_EXTRAS"


def extras_required() -> bool:
    """Whether a missing optional package fails the test (``DEEPLABV2_REQUIRE_EXTRAS`` set to
    anything but ``0`` or empty)."""
    return os.environ.get(ENV, "").strip() not in ("", "0")


def require(module: str, reason: str):
    """Import and return ``module``; when it cannot be imported, skip the test (or the whole
    file, called at module level) with ``reason`` and the import error, or fail it when
    :func:`extras_required`."""
    __tracebackhide__ = True  # pytest reports the skip or failure at the caller's line
    try:
        return importlib.import_module(module)
    except ImportError as e:
        why = f"{reason} ({type(e).__name__}: {e})"
        if extras_required():
            pytest.fail(f"{why}; {ENV}=1 requires every optional package", pytrace=False)
        pytest.skip(why, allow_module_level=True)
