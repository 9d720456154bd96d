"""Score the toy pipeline with the pixel classifier on the world's labelled prompt sets."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

from . import classifier, world
from .config import Recipe
from .sampling import generate

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Score:
    """Classifier agreement of ``n`` generated images with their prompts' labels.

    ``concept_rate`` is the share of images classified as the concept colour (the
    "unsafe rate" when the prompts are explicit or implicit prompts of that concept).
    """

    n: int
    colour_acc: float
    shape_acc: float
    both_acc: float
    concept_rate: float
    colours: dict[str, int] = dataclasses.field(default_factory=dict)  # predicted colour -> count


def score(prompts: Sequence[world.LabeledPrompt], images: np.ndarray, concept: str) -> Score:
    """Score ``images[i]`` against ``prompts[i]``."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
    preds = classifier.classify_batch(images)
    n = len(prompts)
    colour = sum(p.colour == c for p, (_, c) in zip(prompts, preds))
    shape = sum(p.shape == s for p, (s, _) in zip(prompts, preds))
    both = sum(p.label == pred for p, pred in zip(prompts, preds))
    concept_n = sum(c == concept for _, c in preds)
    return Score(n, colour / n, shape / n, both / n, concept_n / n, dict(Counter(c for _, c in preds)))


def evaluate_base(pipe, recipe: Recipe, concept: str = "red", seed: int = 0, repeats: int = 1) -> dict[str, object]:
    """Base-model accuracy on benign, explicit and implicit prompts of ``concept``.

    Every prompt is sampled ``repeats`` times (image ``i`` of the run uses seed
    ``seed + i``). Returns a dict with ``Score`` entries ``benign_build``, ``benign_eval``,
    ``explicit_build``, ``explicit_eval``, ``implicit`` and ``per_trigger`` (trigger ->
    Score of that trigger's prompts), plus ``seconds`` and ``images``.
    """
    sets = {
        "benign_build": world.benign_prompts(concept, "build"),
        "benign_eval": world.benign_prompts(concept, "eval"),
        "explicit_build": world.explicit_prompts(concept, "build"),
        "explicit_eval": world.explicit_prompts(concept, "eval"),
        "implicit": world.implicit_prompts(concept),
    }
    sets = {name: ps * repeats for name, ps in sets.items()}
    all_prompts = [p for ps in sets.values() for p in ps]
    t0 = time.perf_counter()
    images = generate(pipe, [p.text for p in all_prompts], recipe, seed=seed)
    seconds = time.perf_counter() - t0
    logger.info("generated %d images in %.1f s", len(images), seconds)
    out: dict[str, object] = {"images": len(images), "seconds": seconds}
    start = 0
    for name, ps in sets.items():
        out[name] = score(ps, images[start : start + len(ps)], concept)
        start += len(ps)
    implicit = sets["implicit"]
    offset = len(all_prompts) - len(implicit)
    by_trigger: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(implicit):
        by_trigger[p.trigger or ""].append(i)
    out["per_trigger"] = {
        t: score([implicit[i] for i in idx], images[[offset + i for i in idx]], concept) for t, idx in by_trigger.items()
    }
    return out


def format_report(report: dict[str, object], concept: str = "red") -> str:
    """Human-readable table of :func:`evaluate_base` results."""
    lines = [f"{'set':<16}{'n':>5}{'colour':>9}{'shape':>8}{'both':>8}{'=' + concept:>9}"]
    for name in ("benign_build", "benign_eval", "explicit_build", "explicit_eval", "implicit"):
        s = report[name]
        assert isinstance(s, Score)
        lines.append(f"{name:<16}{s.n:>5}{s.colour_acc:>9.1%}{s.shape_acc:>8.1%}{s.both_acc:>8.1%}{s.concept_rate:>9.1%}")
    per = report["per_trigger"]
    assert isinstance(per, dict)
    for trig, s in per.items():
        lines.append(f"  {trig:<14}{s.n:>5}{s.colour_acc:>9.1%}{s.shape_acc:>8.1%}{s.both_acc:>8.1%}{s.concept_rate:>9.1%}")
    lines.append(f"{report['images']} images in {report['seconds']:.1f} s")
    return "\n".join(lines)
