"""Import this repository as one package, the way ComfyUI's custom-node loader does.

The tests without ComfyUI use it instead of ``import nodes`` (the pack's ``nodes`` package uses
relative imports of the engine, and ``nodes`` is ComfyUI's own top-level module name).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
NAME = "saferope_pack"


def load_pack(name: str = NAME) -> ModuleType:
    """The repository's root ``__init__.py`` as package ``name`` (imported once, then cached)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
