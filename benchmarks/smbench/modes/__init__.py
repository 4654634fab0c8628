"""One module per `bench.py MODE`, found by name: a module here that defines NAME, HELP, `add_arguments(parser)`
and `run(args) -> int` is a mode (modules starting with `_` are helpers). `_options.common(parser)` adds the
flags every measuring mode shares. Adding a mode (an `s3` one, say) is adding one such module."""

from __future__ import annotations

import importlib
import pkgutil


def modes() -> list:
    """Every mode module, in the order of their ORDER (then name)."""
    found = [
        importlib.import_module(f"{__name__}.{m.name}")
        for m in pkgutil.iter_modules(__path__)
        if not m.name.startswith("_")
    ]
    return sorted(found, key=lambda m: (getattr(m, "ORDER", 50), m.NAME))
