"""docs/API.md is generated from the code: it must be current, and every public name must say what it is."""

import importlib
import inspect
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _make_api():
    sys.path.insert(0, str(DOCS))
    try:
        return importlib.import_module("make_api")
    finally:
        sys.path.remove(str(DOCS))


def test_api_reference_is_current():
    make_api = _make_api()
    assert (DOCS / "API.md").read_text() == make_api.render(), "docs/API.md is out of date: python docs/make_api.py"


def test_every_public_function_and_class_has_a_docstring():
    make_api = _make_api()
    missing = []
    for module, _title in make_api.MODULES:
        mod = importlib.import_module(module)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and not (obj.__doc__ or "").strip():
                missing.append(f"{module}.{name}")
    assert not missing, missing
