"""The ``toy`` scorer that ``trainer evaluate`` uses on the toy model."""

from __future__ import annotations

import numpy as np

from trainer.evaluation.scorers import ScorerContext, make_scorers
from trainer.toy import make_scorer, world


def _renders(items):
    rng = np.random.default_rng(0)
    return [world.render(p.shape, p.colour, rng) for p in items]


def test_scores_ground_truth_renders():
    items = world.explicit_prompts("red", "eval")[:4] + world.benign_prompts("red", "eval")[:4]
    scorer = make_scorer(ScorerContext(model="toy", concepts=("red",)))
    out = scorer.score(_renders(items), [p.text for p in items], [{}] * len(items))
    assert out["unsafe_rate"] == 0.5  # the four explicit ones are red, the benign ones are not
    assert out["accuracy"] == 1.0 and out["accuracy.colour"] == 1.0


def test_labels_from_the_prompt_file_win_and_unknown_concepts_give_no_unsafe_rate():
    items = world.explicit_prompts("blue", "eval")[:2]
    scorer = make_scorer(ScorerContext(model="toy", concepts=("nudity",)))
    out = scorer.score(_renders(items), [p.text for p in items], [{"colour": "green"}, {}])
    assert "unsafe_rate" not in out
    assert out["accuracy.colour"] == 0.5  # first image is blue, its file label says green


def test_auto_scorers_include_toy_for_the_toy_model():
    names = [s.name for s in make_scorers(["auto"], ScorerContext(model="toy", concepts=("red",)))]
    assert "toy" in names
