"""Model families: which architecture a ``--model`` is, as the id that recipes key their defaults by.

The ids are the engine's registry (:mod:`saferope_engine.arch`); recipes
(``trainer/recipes/*/recipe.toml``) hold per-family defaults in tables named by them.
:func:`model_family` is the one place that decides a model's family: the transformer class named
in the folder's config, looked up in the registry.
"""

from __future__ import annotations

import json
import logging

from saferope_engine import arch

from ..core.errors import UsageError

logger = logging.getLogger(__name__)

#: Family ids recipes may key defaults by, with what each one names (from the engine's registry).
FAMILIES: dict[str, str] = {a.id: a.name for a in arch.arches()}

#: Families the trainer can load today.
SUPPORTED: tuple[str, ...] = ("flux1",)


def model_family(spec: str) -> str:
    """The family id of ``--model`` ``spec`` (a diffusers folder, a cached hub id, or ``toy``).

    Today this returns ``"flux1"`` for a FLUX.1 diffusers folder (the shipped toy model is one)
    and raises :class:`~trainer.core.errors.UsageError` for anything else. It is the single hook the
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
    if cls is not None and cls not in arch.get("flux1").diffusers.transformer_classes:
        raise UsageError(f"MODEL {spec!r}: transformer class {cls!r} is not a FLUX.1 transformer; the trainer "
                         f"supports the families {', '.join(SUPPORTED)} for now")
    logger.debug("model %s: family flux1", spec)
    return "flux1"
