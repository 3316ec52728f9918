"""One exception tree: every exception class of the platform hangs from V2GError and is
drawn, with its parent, in the one docstring of core/errors.py."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import core.errors
from core.errors import V2GError

PACKAGES = ("aggregator", "agents", "broker", "chargers", "core", "v2g")


def platform_exceptions() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for package in PACKAGES:
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
            module = importlib.import_module(info.name)
            for _, obj in inspect.getmembers(module, inspect.isclass):
                if issubclass(obj, BaseException) and obj.__module__ == info.name:
                    found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return list(found.values())


def test_every_exception_of_the_platform_is_a_v2g_error() -> None:
    classes = platform_exceptions()
    assert len(classes) >= 9, classes  # the tree as drawn today; a failed walk finds none
    assert [c for c in classes if not issubclass(c, V2GError)] == []


def test_the_tree_in_the_docstring_draws_every_exception_under_its_parent() -> None:
    doc = core.errors.__doc__ or ""
    lines = [line for line in doc.splitlines() if "──" in line or line.split()[:1] == ["V2GError"]]
    depth: dict[str, tuple[int, int]] = {}  # name: (column, row) where it is drawn
    for row, line in enumerate(lines):
        name = line.split("──")[-1].split()[0]
        depth[name] = (line.index(name), row)
    for cls in platform_exceptions():
        assert cls.__name__ in depth, f"{cls.__name__} is not drawn in core/errors.py's tree"
        if cls is V2GError:
            continue
        parent = cls.__mro__[1].__name__
        column, row = depth[cls.__name__]
        # The parent is the nearest line above drawn one level (4 columns) to the left.
        above = [n for n, (c, r) in depth.items() if r < row and c == column - 4]
        nearest = max(above, key=lambda n: depth[n][1], default=None)
        assert nearest == parent, f"{cls.__name__} is drawn under {nearest}, not {parent}"
