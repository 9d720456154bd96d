"""Boot a real ComfyUI in a driver process, as its ``main.py`` does (shared by the drivers).

Imported by ``comfy_driver.py`` and ``family_driver.py`` before they take their own folder and
the repository off ``sys.path``; nothing of ComfyUI is imported until :func:`boot` runs.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterable
from pathlib import Path


def boot(comfy_path: str, work: Path, packs: Iterable[tuple[str, Path]]) -> dict:
    """CPU, base directory ``work/base`` whose ``custom_nodes`` links ``packs`` (name, folder), every node
    loaded (built-in extras and custom nodes; no API nodes). -> ``{"init_s", "builtin_import_failed"}``."""
    base = work / "base"
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    for name, target in packs:
        link = base / "custom_nodes" / name
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    sys.path.insert(0, comfy_path)
    sys.argv = [sys.argv[0], "--cpu", "--base-directory", str(base), "--disable-api-nodes"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import utils.extra_config  # noqa: F401  (as main.py: claims the name 'utils' for ComfyUI's package)

    import nodes

    t = time.time()
    failed = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    return {"init_s": round(time.time() - t, 2), "builtin_import_failed": list(failed or [])}
