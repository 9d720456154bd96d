"""The ``saferope`` model folder: ``<ComfyUI>/models/saferope`` plus extra_model_paths.yaml entries.

ComfyUI reads ``extra_model_paths.yaml`` before it loads custom nodes; a ``saferope:`` key there
creates the folder entry with the yaml's paths, and :func:`register` then adds the default
folder (first, as ComfyUI does for its own default folders) and restricts the listing to
``.safetensors`` — adapters are never pickles.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

FOLDER = "saferope"
EXTENSIONS = frozenset({".safetensors"})


def folder_paths_module() -> Any | None:
    """ComfyUI's ``folder_paths`` module, or ``None`` outside ComfyUI."""
    try:
        import folder_paths  # type: ignore[import-not-found]
    except ImportError:
        return None
    return folder_paths


def register() -> bool:
    """Register the folder with ComfyUI (idempotent). Returns False outside ComfyUI."""
    fp = folder_paths_module()
    if fp is None:
        return False
    default = os.path.join(fp.models_dir, FOLDER)
    fp.add_model_folder_path(FOLDER, default, is_default=True)
    paths, exts = fp.folder_names_and_paths[FOLDER]
    if set(exts) != EXTENSIONS:
        fp.folder_names_and_paths[FOLDER] = (paths, set(EXTENSIONS))
    logger.debug("SafeRoPE adapters are read from %s", paths)
    return True


def adapter_names() -> list[str]:
    """Adapter files visible to ComfyUI (relative names, as the loader's combo shows them)."""
    fp = folder_paths_module()
    return [] if fp is None else list(fp.get_filename_list(FOLDER))


def adapter_path(name: str) -> str:
    """Absolute path of an adapter listed by :func:`adapter_names`; raises naming the folders searched.

    An entry that is listed but cannot be read as a file is named for what it is: a broken symbolic
    link (with the path it points to) or something other than a regular file.
    """
    fp = folder_paths_module()
    path = None if fp is None else fp.get_full_path(FOLDER, name)
    if path is None:
        where = fp.get_folder_paths(FOLDER) if fp is not None else "(ComfyUI not running)"
        for folder in where if fp is not None else ():
            what = _unusable_entry(os.path.join(folder, os.path.normpath(os.path.join(os.sep, name)).lstrip(os.sep)))
            if what:
                raise FileNotFoundError(f"SafeRoPE adapter {name!r}: {what}")
        raise FileNotFoundError(f"SafeRoPE adapter {name!r} not found in {where}")
    return path


def _unusable_entry(path: str) -> str | None:
    """Why ``path`` exists as a directory entry but is not a readable file, or ``None``."""
    if os.path.islink(path) and not os.path.exists(path):
        target = os.readlink(path)
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), target))
        return (f"{path} is a broken symbolic link pointing to {target!r} ({resolved}), which does not exist; "
                "fix the link or remove it")
    if os.path.exists(path) and not os.path.isfile(path):
        return f"{path} is not a regular file (a directory or a device); adapters are .safetensors files"
    return None
