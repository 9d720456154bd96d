"""Node "Load SafeRoPE Adapter" (``SafeRoPEAdapterLoader``)."""

from __future__ import annotations

import logging
import os

import torch

from ..saferope_engine import SafeRoPEAdapter, load_adapter
from . import folders

logger = logging.getLogger(__name__)

ADAPTER_TYPE = "SAFEROPE_ADAPTER"


class SafeRoPEAdapterLoader:
    """Reads a SafeRoPE adapter (.safetensors, format v1) from ``models/saferope``.

    A malformed file raises the engine's ``AdapterFormatError``, whose message names the file and
    the offending key or tensor; nothing is unpickled.
    """

    DESCRIPTION = ("Loads a SafeRoPE adapter (.safetensors) from ComfyUI's models/saferope folder "
                   "(or a 'saferope:' entry of extra_model_paths.yaml).")
    CATEGORY = "SafeRoPE"
    FUNCTION = "load"
    RETURN_TYPES = (ADAPTER_TYPE,)
    RETURN_NAMES = ("adapter",)
    OUTPUT_TOOLTIPS = ("The adapter: safety-critical heads, unsafe subspaces and rotations. "
                       "Connect it to 'Apply SafeRoPE to Model'.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"adapter_name": (folders.adapter_names(), {
            "tooltip": "Adapter file in models/saferope (or a folder listed under 'saferope:' in "
                       "extra_model_paths.yaml). Press R in the UI to refresh the list after adding files."})}}

    @classmethod
    def IS_CHANGED(cls, adapter_name: str) -> str:
        """Re-run when the file changes on disk (size and modification time)."""
        try:
            st = os.stat(folders.adapter_path(adapter_name))
        except (FileNotFoundError, OSError):
            return f"missing:{adapter_name}"
        return f"{st.st_size}:{st.st_mtime_ns}"

    def load(self, adapter_name: str) -> tuple[SafeRoPEAdapter]:
        # ComfyUI executes nodes under torch.inference_mode(); tensors made there are "inference
        # tensors" without a version counter, which the engine's device caches rely on.
        with torch.inference_mode(False):
            adapter = load_adapter(folders.adapter_path(adapter_name))
        m = adapter.meta
        logger.info("SafeRoPE: loaded %s — concepts %s, %d blocks, %d heads, rank %d, threshold %.3g, base %r",
                    adapter_name, list(m.concepts), len(adapter.blocks),
                    sum(b.heads.numel() for b in adapter.blocks.values()), m.rank, m.threshold, m.base_model)
        return (adapter,)
