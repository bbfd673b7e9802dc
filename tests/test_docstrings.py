"""Every runnable example in the package's docstrings gives the output it shows."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import lightning_saliency

MODULES = sorted(m.name for m in pkgutil.walk_packages(lightning_saliency.__path__, "lightning_saliency."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (run pytest -s to see)"
