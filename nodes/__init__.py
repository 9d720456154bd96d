"""SafeRoPE nodes for ComfyUI (V1 node API, which every ComfyUI from 0.3.x to 0.20 loads).

Node ids are permanent — saved workflows reference them — and never renamed:

* ``SafeRoPEAdapterLoader`` — "Load SafeRoPE Adapter"
* ``SafeRoPEApply`` — "Apply SafeRoPE to Model"
* ``SafeRoPELRSVisualizer`` — "LRS Visualizer"
* ``SafeRoPERiskCheck`` — "SafeRoPE Risk Check" (max risk and a flag, for branching workflows)
* ``SafeRoPEToy…`` — the shipped toy model's loader, text encode, VAE decode and empty latent
  (category "SafeRoPE/toy", :mod:`.toy`)

Importing this package registers the ``saferope`` model folder when ComfyUI is running and does
nothing else; without ComfyUI it imports cleanly (the node classes import ComfyUI lazily).
"""

from __future__ import annotations

from . import folders, toy
from .apply import SafeRoPEApply
from .loader import SafeRoPEAdapterLoader
from .risk_check import SafeRoPERiskCheck
from .visualizer import SafeRoPELRSVisualizer

folders.register()

NODE_CLASS_MAPPINGS = {
    "SafeRoPEAdapterLoader": SafeRoPEAdapterLoader,
    "SafeRoPEApply": SafeRoPEApply,
    "SafeRoPELRSVisualizer": SafeRoPELRSVisualizer,
    "SafeRoPERiskCheck": SafeRoPERiskCheck,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SafeRoPEAdapterLoader": "Load SafeRoPE Adapter",
    "SafeRoPEApply": "Apply SafeRoPE to Model",
    "SafeRoPELRSVisualizer": "LRS Visualizer",
    "SafeRoPERiskCheck": "SafeRoPE Risk Check",
}
NODE_CLASS_MAPPINGS.update(toy.NODE_CLASS_MAPPINGS)
NODE_DISPLAY_NAME_MAPPINGS.update(toy.NODE_DISPLAY_NAME_MAPPINGS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
