"""Model families: which architecture a ``--model`` is, as the id that recipes key their defaults by.

Recipes (``trainer/recipes/*/recipe.toml``) hold per-family defaults in tables named by these ids.
:func:`model_family` is the one place that decides a model's family; today the trainer runs
FLUX.1 only, so it recognises FLUX.1 diffusers folders (``flux1``) and refuses everything else.
The model-families work extends :func:`model_family` (and the loaders) family by family; the ids
are fixed here so that recipes can already carry defaults for them.
"""

from __future__ import annotations

import json
import logging

from .errors import UsageError

logger = logging.getLogger(__name__)

#: Family ids recipes may key defaults by, with what each one names.
FAMILIES: dict[str, str] = {
    "flux1": "FLUX.1 [dev]/[schnell] and fine-tunes (FluxTransformer2DModel)",
    "flux2": "FLUX.2",
    "chroma": "Chroma (FLUX.1-schnell derived)",
    "hunyuan_image": "HunyuanImage",
    "qwen_image": "Qwen-Image",
    "z_image": "Z-Image",
}

#: Families the trainer can load today (the rest are reserved for the model-families work).
SUPPORTED: tuple[str, ...] = ("flux1",)

_FLUX1_CLASSES = ("FluxTransformer2DModel",)


def model_family(spec: str) -> str:
    """The family id of ``--model`` ``spec`` (a diffusers folder, a cached hub id, or ``toy``).

    Today this returns ``"flux1"`` for a FLUX.1 diffusers folder (the shipped toy model is one)
    and raises :class:`~trainer.errors.UsageError` for anything else. It is the single hook the
    model-families work extends: when the trainer learns a new architecture, this function
    starts returning its id from :data:`FAMILIES`, and every recipe's ``[defaults.<id>]`` table
    applies to it without further changes.
    """
    from .models import resolve_model

    info = resolve_model(spec, need=("transformer",))  # the folder exists and parses as FLUX
    config = info.path / "transformer" / "config.json"
    try:
        cls = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, json.JSONDecodeError):  # resolve_model read it a moment ago
        cls = None
    if cls is not None and cls not in _FLUX1_CLASSES:
        raise UsageError(f"MODEL {spec!r}: transformer class {cls!r} is not a FLUX.1 transformer; the trainer "
                         f"supports the families {', '.join(SUPPORTED)} for now")
    logger.debug("model %s: family flux1", spec)
    return "flux1"
