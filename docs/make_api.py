"""Write docs/API.md, the API reference, from the public names (``__all__``) of each public module and their
docstrings and signatures. ``python docs/make_api.py`` refreshes it; a test fails when it is out of date.

    python docs/make_api.py           # writes docs/API.md
    python docs/make_api.py --check   # exit 1 if docs/API.md differs from what the code says
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path

#: the public modules, in the order a model goes through them (capture -> ... -> export)
MODULES = [
    ("qsurgery", "The package: the names most users need"),
    ("qsurgery.data", "Images and batches"),
    ("qsurgery.models", "Built-in models"),
    ("qsurgery.calibration", "Calibration data: coverage, distilled images"),
    ("qsurgery.analysis", "Analysis: which layers break, and why"),
    ("qsurgery.passes", "Passes and techniques: change the graph or the weights"),
    ("qsurgery.targets", "Device targets"),
    ("qsurgery.cost", "Cost on a target"),
    ("qsurgery.detection", "Detection evaluation"),
    ("qsurgery.executor", "Scale-out"),
    ("qsurgery.export", "Export"),
    ("qsurgery.io", "Save and load"),
]
OUT = Path(__file__).with_name("API.md")


def _signature(obj) -> str:
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    text = re.sub(r"(: |-> )'([^']*)'", r"\1\2", text)  # annotations are strings here (postponed evaluation)
    return re.sub(r" at 0x[0-9a-f]+", "", text)  # default objects' addresses change from run to run


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__) if obj.__doc__ else ""


def _entry(module: str, name: str, obj) -> list[str]:
    lines: list[str] = []
    if inspect.isclass(obj):
        lines += [f"### `{module}.{name}`", "", f"```python\nclass {name}{_signature(obj)}\n```", "", _doc(obj), ""]
        for attr, member in inspect.getmembers(obj):
            if attr.startswith("_") or attr not in obj.__dict__:
                continue
            if inspect.isfunction(member) or isinstance(inspect.getattr_static(obj, attr), property):
                target = member if inspect.isfunction(member) else inspect.getattr_static(obj, attr).fget
                head = f"{attr}{_signature(target)}" if inspect.isfunction(member) else f"{attr}  (property)"
                lines += [f"- `{head}`" + (f": {_doc(target).splitlines()[0]}" if _doc(target) else "")]
        lines.append("")
    elif callable(obj):
        lines += [f"### `{module}.{name}`", "", f"```python\n{name}{_signature(obj)}\n```", "", _doc(obj), ""]
    else:
        kind = type(obj).__name__
        lines += [f"### `{module}.{name}`", "", f"A `{kind}`." + (f" Keys: {', '.join(sorted(map(str, obj)))}."
                                                                   if isinstance(obj, dict) else ""), ""]
    return lines


def render() -> str:
    """The API reference as markdown."""
    lines = ["# qsurgery API reference", "",
             "Generated from the code by `python docs/make_api.py`; every public name of every public module.", ""]
    lines += [f"- [{title}](#{module.replace('.', '')})" for module, title in MODULES] + [""]
    for module, title in MODULES:
        mod = importlib.import_module(module)
        lines += [f"## {module}", "", f"{title}. " + (_doc(mod).split(chr(10) + chr(10))[0].replace(chr(10), " ")
                                                        if _doc(mod) else ""), ""]
        for name in mod.__all__:
            if name.startswith("__"):
                continue
            lines += _entry(module, name, getattr(mod, name))
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/API.md is out of date")
    args = ap.parse_args()
    text = render()
    if args.check:
        same = OUT.exists() and OUT.read_text() == text
        print("docs/API.md is up to date" if same else "docs/API.md is out of date: run python docs/make_api.py")
        return 0 if same else 1
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
