"""Which ComfyUI tree the tests run against, and which third-party node packs are tested on it.

Read at collection time (no ComfyUI import): the tree's version comes from its
``comfyui_version.py``. Tests that cannot apply to a tree are not generated for it (CI fails on
any skip); where a pack is known not to work on a tree, a test asserting exactly that failure is
generated instead, so every cell of the README's compatibility table comes from a test that ran.

The node packs are unmodified copies in ``SAFEROPE_NODEPACKS`` (default: ``../shared/nodepacks``
beside the repository, where CI lays them out). The driver links them into the test ComfyUI's
``custom_nodes``; their code is never part of this repository.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from comfy_env import REPO


@dataclass(frozen=True)
class NodePack:
    """A third-party node pack and the ComfyUI versions where it works by itself."""

    folder: str  # folder name in the nodepacks directory and in custom_nodes
    upstream: str
    works_below: tuple[int, ...] | None  # None: on every tested version; else only on versions below this
    broken_how: str = ""  # how it fails by itself on newer versions (what the "does not work" test asserts)

    def works_on(self, version: tuple[int, ...] | None) -> bool:
        return self.works_below is None or version is None or version < self.works_below


#: The packs of ../shared/nodepacks. TeaCache and First Block Cache were written against ComfyUI 0.3.x;
#: on 0.20.1 TeaCache fails to import and First Block Cache's copy of forward_orig fails when sampling.
PACKS = {
    "gguf": NodePack("ComfyUI-GGUF", "city96/ComfyUI-GGUF", None),
    "teacache": NodePack("ComfyUI-TeaCache", "welltop-cn/ComfyUI-TeaCache", (0, 4), "import"),
    "fbcache": NodePack("Comfy-WaveSpeed", "chengzeyi/Comfy-WaveSpeed", (0, 4), "sampling"),
}


def nodepacks_dir() -> Path:
    """Where the third-party node packs are (``SAFEROPE_NODEPACKS`` or ``../shared/nodepacks``)."""
    env = os.environ.get("SAFEROPE_NODEPACKS")
    return Path(env).resolve() if env else REPO.parent / "shared" / "nodepacks"


def tree_version(tree: str | os.PathLike | None) -> tuple[int, ...] | None:
    """``(major, minor, patch)`` from ``<tree>/comfyui_version.py``, or ``None`` without a readable tree."""
    if not tree:
        return None
    try:
        text = (Path(tree) / "comfyui_version.py").read_text()
    except OSError:
        return None
    m = re.search(r"__version__\s*=\s*['\"](\d+(?:\.\d+)*)", text)
    return tuple(int(x) for x in m.group(1).split(".")) if m else None


def current_version() -> tuple[int, ...] | None:
    """The version of the tree in ``COMFYUI_PATH`` (``None`` when unset: every test then skips)."""
    return tree_version(os.environ.get("COMFYUI_PATH"))
