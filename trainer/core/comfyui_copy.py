"""``--comfyui PATH``: put an adapter where a ComfyUI installation finds it, never overwriting a file.

ComfyUI reads SafeRoPE adapters from ``<ComfyUI>/models/saferope/`` (the pack registers that
folder). A ComfyUI folder is recognised by its ``models/`` folder next to ``main.py`` (a source
checkout or portable install) or ``custom_nodes/`` (a ``--base-directory`` / desktop user folder).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .errors import TrainerError, UsageError

logger = logging.getLogger(__name__)

#: The file name the toy example workflow (example_workflows/saferope_toy_demo.json) loads, per concept.
TOY_ADAPTER_NAME = "saferope-toy-{concept}.safetensors"


def toy_adapter_name(concept: str) -> str:
    return TOY_ADAPTER_NAME.format(concept=concept)


def destination(comfyui: str | Path, name: str) -> Path:
    """``comfyui/models/saferope/name``, after checking that ``comfyui`` is a ComfyUI folder and the file is new.

    Raises :class:`UsageError` (before any work is done) naming what is wrong.
    """
    root = Path(comfyui).expanduser()
    if not root.is_dir():
        raise UsageError(f"--comfyui {str(comfyui)!r}: no such folder")
    if not (root / "models").is_dir() or not ((root / "main.py").is_file() or (root / "custom_nodes").is_dir()):
        raise UsageError(f"--comfyui {str(comfyui)!r} is not a ComfyUI folder (expected models/ next to main.py "
                         "or custom_nodes/)")
    target = root / "models" / "saferope" / name
    if target.exists() or target.is_symlink():
        raise UsageError(f"--comfyui: {target} exists already and is never overwritten; move it away first (or "
                         "copy OUT/adapter.safetensors yourself under another name)")
    if (root / "models" / "saferope").exists() and not (root / "models" / "saferope").is_dir():
        raise UsageError(f"--comfyui: {root / 'models' / 'saferope'} is not a folder")
    return target


def copy_new(source: Path, target: Path) -> Path:
    """Copy ``source`` to ``target``, creating ``models/saferope`` if needed; refuse if ``target`` appeared meanwhile."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(source, "rb") as src, open(target, "xb") as dst:  # "x": never replaces an existing file
            shutil.copyfileobj(src, dst)
    except FileExistsError as e:
        raise TrainerError(f"--comfyui: {target} appeared while the demo ran; it was left as it is "
                           f"(the new adapter is {source})") from e
    logger.info("adapter copied to %s", target)
    return target
