"""The switch that makes a missing optional package a failure (``tests/extras.py``), and that the
reference tests go through it."""

import json
import re
from pathlib import Path

import pytest

from extras import ENV, require

MISSING = "deeplabv2_no_such_package"


def test_an_installed_package_is_returned():
    assert require("json", "the standard library") is json


def test_a_missing_package_skips_by_default_and_fails_when_extras_are_required(monkeypatch):
    for value in (None, "", "0"):
        if value is None:
            monkeypatch.delenv(ENV, raising=False)
        else:
            monkeypatch.setenv(ENV, value)
        with pytest.raises(pytest.skip.Exception, match=f"not here.*{MISSING}"):
            require(MISSING, "not here")
    monkeypatch.setenv(ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=f"not here.*{MISSING}.*{ENV}=1"):
        require(MISSING, "not here")


def test_no_test_skips_on_a_missing_package_by_itself():
    """``pytest.importorskip`` (or a skip of our own on an ImportError) would skip a reference
    test even where ``make test`` installed every extra: they import through ``require``."""
    here = Path(__file__).parent
    for path in sorted(here.glob("*.py")):
        if path.name in ("extras.py", Path(__file__).name):
            continue
        text = path.read_text()
        assert "importorskip" not in text, path.name
        assert not re.search(r"except ImportError:\s*\n\s*pytest\.skip", text), path.name


def test_make_test_requires_every_extra():
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    runs = [line for line in makefile.splitlines() if "-m pytest" in line]
    assert len(runs) == 2 and all(f"{ENV}=1 " in line for line in runs), runs
