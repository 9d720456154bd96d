"""Scorer interface: label classifiers (the toy world's), NudeNet detection, selection by name."""

from __future__ import annotations

import sys
import types

import pytest
from PIL import Image

from trainer.core.errors import UsageError
from trainer.evaluation.scorers import LabelScorer, NudeNetScorer, ScorerContext, make_scorers, register_scorer


def _img(colour: str) -> Image.Image:
    return Image.new("RGB", (4, 4), {"red": (255, 0, 0), "blue": (0, 0, 255)}[colour])


def _classify(im: Image.Image) -> dict[str, str]:
    r, g, b = im.getpixel((0, 0))
    return {"colour": "red" if r > b else "blue", "shape": "circle"}


def test_label_scorer_rates_and_accuracies():
    scorer = LabelScorer("toy", classify=_classify, unsafe={"colour": "red"})
    images = [_img("red"), _img("blue"), _img("blue"), _img("red")]
    prompts = ["a red circle", "a red circle", "a blue circle", "a blue square"]
    labels = [{"colour": "red"}, {"colour": "red"}, {"colour": "blue", "shape": "circle"}, {"shape": "square"}]
    m = scorer.score(images, prompts, labels)
    assert m["unsafe_rate"] == 0.5
    assert m["accuracy"] == 0.5  # images 0 and 2 match everything expected of them
    assert m["accuracy.colour"] == pytest.approx(2 / 3) and m["accuracy.shape"] == 0.5
    assert m["share.colour.red"] == 0.5


def test_label_scorer_expected_from_prompt():
    scorer = LabelScorer("toy", classify=_classify, unsafe={"colour": ["red", "crimson"]},
                         expected=lambda p: {"colour": p.split()[1]})
    m = scorer.score([_img("blue"), _img("blue")], ["a red x", "a blue x"], [{}, {}])
    assert m["unsafe_rate"] == 0.0 and m["accuracy"] == 0.5


def test_nudenet_is_detected_and_used(monkeypatch):
    calls = []

    class FakeDetector:
        def detect(self, path):
            calls.append(path)
            return [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.9, "box": [0, 0, 1, 1]}] if len(calls) == 1 else \
                [{"class": "FACE_FEMALE", "score": 0.99, "box": [0, 0, 1, 1]}]

    fake = types.ModuleType("nudenet")
    fake.NudeDetector = FakeDetector
    fake.__spec__ = types.SimpleNamespace(name="nudenet")  # type: ignore[assignment]
    monkeypatch.setitem(sys.modules, "nudenet", fake)
    monkeypatch.setattr("trainer.evaluation.scorers.nudenet_available", lambda: True)
    scorers = make_scorers(["auto"], ScorerContext(model="/models/flux"))
    assert [s.name for s in scorers] == ["nudenet"] and isinstance(scorers[0], NudeNetScorer)
    m = scorers[0].score([_img("red"), _img("blue")], ["p", "q"], [{}, {}])
    assert m == {"unsafe_rate": 0.5, "detections_per_image": 0.5} and len(calls) == 2


def test_scorer_selection(monkeypatch):
    monkeypatch.setattr("trainer.evaluation.scorers.nudenet_available", lambda: False)
    assert make_scorers(["auto"], ScorerContext(model="/models/flux")) == []
    assert make_scorers(["none"], ScorerContext(model="toy")) == []
    with pytest.raises(UsageError, match="needs the optional `nudenet` package"):
        make_scorers(["nudenet"], ScorerContext(model="x"))
    with pytest.raises(UsageError, match="unknown scorer 'lpips'"):
        make_scorers(["lpips"], ScorerContext(model="x"))
    with pytest.raises(UsageError, match="scorer 'clip' needs a local CLIP folder"):
        make_scorers(["clip"], ScorerContext(model="x"))
    register_scorer("colour", lambda ctx: LabelScorer("colour", classify=_classify, unsafe={"colour": ctx.concepts[0]}))
    (s,) = make_scorers(["colour"], ScorerContext(model="x", concepts=("red",)))
    assert s.score([_img("red")], ["p"], [{}])["unsafe_rate"] == 1.0
