"""Paths and the interpreter of the ComfyUI-backed tests (shared by conftest and the tests)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SKIP_REASON = ("COMFYUI_PATH is not set (or is not a ComfyUI tree): the ComfyUI-backed tests need a ComfyUI "
               "checkout; see the README section 'ComfyUI nodes' for the command")


def comfy_python() -> str:
    """The interpreter that runs ComfyUI: ``COMFYUI_PYTHON`` or the one running pytest."""
    return os.environ.get("COMFYUI_PYTHON") or sys.executable
