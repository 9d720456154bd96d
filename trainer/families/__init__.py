"""Model families: the trainer side of each family of the engine's registry, and which family a model is.

:data:`FAMILIES` maps each registry id (:mod:`saferope_engine.arch`) to its trainer module's
:class:`~.base.Family` — how that family's pipeline encodes prompts, how its transformer is called
for a velocity, how its latents are packed, how it generates. It is the only place that knows
the entries; recipes (``trainer/recipes/*/recipe.toml``) key per-family defaults by these ids.

:func:`.models.model_family` is the one place that decides a model's family: from the folder
itself — ``model_index.json``'s pipeline class and the transformer class, looked up in the
engine's registry (:func:`.models.resolve_model`) — never from a flag the user must get right.

Adding a family: the engine module (``saferope_engine/arch/<id>.py``), one module here with
``FAMILY = <Family subclass>()`` added to the table below, and a tiny pipeline of the family in
``tests/tiny_families.py``.
"""

from __future__ import annotations

from saferope_engine import arch

from . import chroma, flux1, flux2, hunyuan_image, qwen_image, z_image
from .base import Family

#: The trainer's family modules by registry id (the only place that knows them).
FAMILIES: dict[str, Family] = {m.FAMILY.id: m.FAMILY for m in (flux1, flux2, chroma, hunyuan_image, qwen_image,
                                                                 z_image)}
if set(FAMILIES) != set(arch.ids()):  # pragma: no cover - a registry family without a trainer module
    raise ImportError(f"trainer families {sorted(FAMILIES)} differ from the engine's registry {sorted(arch.ids())}")


def family(family_id: str) -> Family:
    """The trainer module of a registry id."""
    return FAMILIES[family_id]


__all__ = ["FAMILIES", "Family", "family"]
