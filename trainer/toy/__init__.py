"""The toy concept world: a tiny offline FLUX pipeline trained on coloured shapes.

It is the product's demo model and efficacy benchmark (design.md, section 6):

* :mod:`trainer.toy.world` - the synthetic world (renderer, captions, triggers, prompt sets),
* :mod:`trainer.toy.classifier` - the deterministic pixel classifier ``image -> (shape, colour)``,
* ``TOY_MODEL_DIR`` - the shipped ``diffusers.FluxPipeline`` folder, with its sampling
  recipe in ``toy_recipe.json`` (see :func:`load_recipe`),
* ``python -m trainer.toy train|eval`` - retrain / evaluate it,
* :func:`register_extension` - what makes ``--model toy`` and ``--scorer toy`` known to the trainer.

Importing this package needs only numpy; torch and diffusers are imported on use.
"""

from __future__ import annotations

from pathlib import Path

from .config import RECIPE_FILE, TOY_MODEL_DIR, Recipe


def load_recipe(folder: str | Path | None = None) -> Recipe:
    """The sampling recipe of a toy pipeline folder (default: ``TOY_MODEL_DIR``)."""
    return Recipe.load(Path(folder) if folder is not None else TOY_MODEL_DIR)


def load_pipeline(folder: str | Path | None = None, **kwargs):
    """``FluxPipeline`` of a toy folder, loaded offline (default: ``TOY_MODEL_DIR``); see :mod:`.sampling`."""
    from .sampling import load_pipeline as _load

    return _load(folder, **kwargs)


def make_scorer(ctx):
    """The ``toy`` scorer of ``trainer evaluate``: the pixel classifier as a :class:`~trainer.evaluation.scorers.LabelScorer`.

    Unsafe = an image classified as one of the evaluated adapters' concepts (``ctx.concepts``)
    that is a world colour; expected labels come from the prompt file or, for world captions,
    from :func:`trainer.toy.world.label_of`.
    """
    from trainer.evaluation.scorers import LabelScorer

    from . import classifier, world

    def classify(image) -> dict[str, str]:
        shape, colour = classifier.classify(image)
        return {"shape": shape, "colour": colour}

    def expected(prompt: str) -> dict[str, str]:
        label = world.label_of(prompt)
        return {"shape": label[0], "colour": label[1]} if label else {}

    concepts = [c for c in ctx.concepts if c in world.CONCEPTS]
    return LabelScorer("toy", classify, {"colour": concepts} if concepts else {}, expected)


def register_extension() -> None:
    """Register the toy world with the trainer, as any extension does (:mod:`trainer.extensions`):
    ``--model toy`` is :data:`TOY_MODEL_DIR`, and ``--scorer toy`` (part of ``auto`` for that model) is
    :func:`make_scorer`."""
    from trainer.evaluation.attacks import register_attack
    from trainer.evaluation.scorers import register_scorer
    from trainer.families.models import register_model

    from . import attacks

    register_model("toy", TOY_MODEL_DIR)
    register_scorer("toy", make_scorer, auto=lambda ctx: ctx.model == "toy")
    register_attack("toy", attacks.applies, attacks.evaluate_attacks)


__all__ = ["TOY_MODEL_DIR", "make_scorer", "register_extension", "RECIPE_FILE", "Recipe", "load_recipe",
           "load_pipeline"]
