"""Extensions: modules that add named models, scorers and the like through the trainer's public
registration functions (:func:`trainer.families.models.register_model`,
:func:`trainer.evaluation.scorers.register_scorer`).

An extension is a module with a ``register_extension()`` function (or an ``module:function``
reference). The trainer loads, once per process and in this order:

* the shipped ones (:data:`SHIPPED`: the toy world, :mod:`trainer.toy`, which registers the model
  ``toy`` and the scorer ``toy`` exactly as any user extension would);
* installed packages' entry points of the group :data:`ENTRY_POINT_GROUP`;
* the comma-separated references in the environment variable :data:`ENV`.

An extension that fails to import or register is skipped; its error is kept (:func:`failures`) and
named where something it might have provided is looked up, so a missing optional part of an
install is one line, not a traceback. The registries call :func:`load_extensions` before they
answer; nothing here imports a module of the trainer.
"""

from __future__ import annotations

import importlib
import logging
import os

logger = logging.getLogger(__name__)

#: Extensions that ship with this package.
SHIPPED: tuple[str, ...] = ("trainer.toy",)
#: Entry-point group of installed extensions (``[project.entry-points."saferope_trainer.extensions"]``).
ENTRY_POINT_GROUP = "saferope_trainer.extensions"
#: Environment variable with more extensions, e.g. ``SAFEROPE_TRAINER_EXTENSIONS=mypkg.scorers,other:setup``.
ENV = "SAFEROPE_TRAINER_EXTENSIONS"

_loaded: dict[str, str | None] = {}  # reference -> None (registered) or the error


def _references() -> list[str]:
    refs = list(SHIPPED)
    try:
        from importlib.metadata import entry_points

        refs += [ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)]
    except Exception as e:  # pragma: no cover - broken install metadata
        logger.debug("entry points of %s unreadable: %s", ENTRY_POINT_GROUP, e)
    refs += [r.strip() for r in os.environ.get(ENV, "").split(",") if r.strip()]
    return list(dict.fromkeys(refs))


def _register(ref: str) -> None:
    module_name, _, function = ref.partition(":")
    module = importlib.import_module(module_name.strip())
    register = getattr(module, function.strip() or "register_extension", None)
    if not callable(register):
        raise AttributeError(f"{module_name} has no {function.strip() or 'register_extension'}()")
    register()


def load_extensions() -> dict[str, str]:
    """Load every extension not loaded yet; returns ``{reference: error}`` of those that failed (ever)."""
    for ref in _references():
        if ref in _loaded:
            continue
        _loaded[ref] = None  # set first: an extension that looks something up while registering sees itself loaded
        try:
            _register(ref)
        except Exception as e:  # an optional extension must not break the trainer: keep and report the error
            _loaded[ref] = f"{type(e).__name__}: {e}"
            logger.debug("extension %s not loaded: %s", ref, _loaded[ref])
    return failures()


def failures() -> dict[str, str]:
    """Extensions that could not be loaded, with their errors."""
    return {ref: err for ref, err in _loaded.items() if err is not None}
