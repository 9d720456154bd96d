"""What each model family is in a ComfyUI tree, read from the tree's source files without importing it.

Used by ``test_comfy_families.py`` at collection time (which families and hook modes a tree has,
so no test is generated that the tree cannot run) and by ``family_models.py`` inside ComfyUI
(the config class a tiny model is built from). Standard library only.

A family is *in* a tree when its ComfyUI config class (``comfy/supported_models.py``) and the
``BaseModel`` classes it needs (``comfy/model_base.py``) are defined there. Whether its blocks
call ``attn1_patch`` is read from the class whose ``forward`` would make the call: the first
definition of that class name in the family's own package, else in the shared Flux layers
(Chroma had its own block classes in 0.3.64 and uses Flux's in 0.20.1).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TreeFamily:
    """How a registry family appears in ComfyUI's source.

    Attributes:
        family: the registry id (``saferope_engine.arch``).
        config_class: the ``comfy.supported_models`` class a tiny model is built from.
        model_class: the ``comfy.model_base`` class of the built model.
        package: the family's folder under ``comfy/ldm``.
        hook_classes: names of the classes whose ``forward`` calls ``attn1_patch`` where the tree
            has the hook (one per block kind), or ``()`` when the registry uses object patches only.
    """

    family: str
    config_class: str
    model_class: str
    package: str
    hook_classes: tuple[str, ...]


_FLUX_BLOCKS = ("DoubleStreamBlock", "SingleStreamBlock")
FAMILIES: tuple[TreeFamily, ...] = (
    TreeFamily("flux1", "Flux", "Flux", "flux", _FLUX_BLOCKS),
    TreeFamily("flux2", "Flux2", "Flux2", "flux", _FLUX_BLOCKS),
    TreeFamily("chroma", "Chroma", "Chroma", "chroma", _FLUX_BLOCKS),
    TreeFamily("hunyuan_image", "HunyuanImage21", "HunyuanImage21", "hunyuan_video", _FLUX_BLOCKS),
    TreeFamily("qwen_image", "QwenImage", "QwenImage", "qwen_image", ("Attention",)),
    TreeFamily("z_image", "ZImage", "Lumina2", "lumina", ()),
)
BY_ID = {f.family: f for f in FAMILIES}

#: Models of no supported family, built tiny through their ComfyUI config class:
#: (case, config class, model class, what the error must say about it).
UNSUPPORTED: tuple[tuple[str, str, str, str], ...] = (
    ("lumina2", "Lumina2", "Lumina2", "Lumina 2 is not covered"),
    ("hidream", "HiDream", "HiDream", "no hook before RoPE"),
    ("sd3", "SD3", "SD3", "no rotary embedding"),
    ("auraflow", "AuraFlow", "AuraFlow", "SafeRoPE does not support this model"),  # unknown: no reason on file
)


def _classes(path: Path) -> dict[str, ast.ClassDef]:
    """Top-level class definitions of a Python file (empty if the file is absent)."""
    if not path.is_file():
        return {}
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def _strings_in_forward(cls: ast.ClassDef) -> set[str]:
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == "forward":
            return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return set()


def version(tree: Path) -> str:
    """``__version__`` of ``comfyui_version.py`` (``"unknown"`` when absent)."""
    path = tree / "comfyui_version.py"
    if path.is_file():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__version__" for t in node.targets):
                return str(ast.literal_eval(node.value))
    return "unknown"


def hook_class_file(tree: Path, fam: TreeFamily, name: str) -> Path | None:
    """The file defining block class ``name`` for this family: its own package first, then Flux's layers."""
    pkg = tree / "comfy" / "ldm" / fam.package
    for path in sorted(pkg.glob("*.py")) + [tree / "comfy" / "ldm" / "flux" / "layers.py"]:
        if name in _classes(path):
            return path
    return None


def families_in(tree: Path) -> list[str]:
    """Registry ids of the families whose config and model classes this tree defines."""
    configs = _classes(tree / "comfy" / "supported_models.py")
    models = _classes(tree / "comfy" / "model_base.py")
    return [f.family for f in FAMILIES if f.config_class in configs and f.model_class in models]


def unsupported_in(tree: Path) -> list[str]:
    """Cases of :data:`UNSUPPORTED` whose classes this tree defines."""
    configs = _classes(tree / "comfy" / "supported_models.py")
    models = _classes(tree / "comfy" / "model_base.py")
    return [case for case, cfg, model, _ in UNSUPPORTED if cfg in configs and model in models]


def calls_attn1(tree: Path, family: str) -> bool:
    """Whether every hook class of the family has ``"attn1_patch"`` in its ``forward`` in this tree."""
    fam = BY_ID[family]
    if not fam.hook_classes:
        return False
    for name in fam.hook_classes:
        path = hook_class_file(tree, fam, name)
        if path is None or "attn1_patch" not in _strings_in_forward(_classes(path)[name]):
            return False
    return True
