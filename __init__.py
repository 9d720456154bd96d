"""ComfyUI entry point of SafeRoPE: ComfyUI's custom-node loader imports this directory as a package.

Put (or clone) this repository into ``ComfyUI/custom_nodes/``. Only relative imports are used
below and inside the pack: ComfyUI has a top-level module named ``nodes`` of its own, so the
repository root must never be on ``sys.path`` of a ComfyUI process.

pytest imports this file on its own as well (the repository root is a package directory, and a
directory name such as ``comfyui-saferope`` is no valid package name), without a parent
package; the nodes are then simply not exposed.
"""

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # imported as a plain module (pytest's package setup): relative imports are impossible
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
