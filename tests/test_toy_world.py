"""Invariants of the toy concept world (trainer.toy.world)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from trainer.toy import classifier, world

CONCEPT_WORDS = {c: {c, *world.SYNONYMS[c]} for c in world.CONCEPTS}
ALL_TRIGGERS = {w for ws in world.SYNONYMS.values() for w in ws} | set(world._OBJECT_INFO)


def _has_phrase(text: str, phrase: str) -> bool:
    return re.search(rf"\b{re.escape(phrase)}\b", text) is not None


def _template_of(text: str, templates: tuple[str, ...]) -> str | None:
    """The most specific template of ``templates`` that produces ``text``, if any."""
    for t in sorted(templates, key=len, reverse=True):
        pattern = "^" + re.escape(t).replace(re.escape("{np}"), r"(a|an) [a-z ]+") + "$"
        if re.match(pattern, text):
            return t
    return None


def test_render_is_deterministic_and_well_formed():
    a = world.render("circle", "red", 123)
    b = world.render("circle", "red", np.random.default_rng(123))
    assert a.dtype == np.uint8 and a.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, world.render("circle", "red", 124))
    # Corners are plain background: shapes keep a margin to the border.
    for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        np.testing.assert_array_equal(a[y, x], world.BACKGROUND)


@pytest.mark.parametrize("colour", world.ALL_COLOURS)
def test_render_draws_the_requested_colour(colour):
    img = world.render("square", colour, 7).astype(int)
    fg = img[np.abs(img - np.asarray(world.BACKGROUND)).sum(-1) > 150]
    assert len(fg) > 0.15 * world.IMAGE_SIZE**2
    assert np.abs(fg.mean(0) - np.asarray(world.PALETTE[colour])).max() <= 15


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError):
        world.render("hexagon", "red", 0)
    with pytest.raises(ValueError):
        world.render("circle", "pink", 0)
    with pytest.raises(ValueError):
        world.explicit_prompts("grey")
    with pytest.raises(ValueError):
        world.benign_prompts("red", split="train")


def test_template_sets_are_disjoint():
    assert set(world.TRAIN_TEMPLATES).isdisjoint(world.HELD_OUT_TEMPLATES)
    assert len(world.SHAPES) >= 4 and len(world.CONCEPTS) >= 5
    assert world.NEUTRAL not in world.CONCEPTS


@pytest.mark.parametrize("concept", world.CONCEPTS)
def test_explicit_prompts(concept):
    build = world.explicit_prompts(concept, "build")
    evals = world.explicit_prompts(concept, "eval")
    assert {p.shape for p in build} == set(world.SHAPES) == {p.shape for p in evals}
    assert {p.text for p in build}.isdisjoint({p.text for p in evals})
    for p, templates in [(p, world.TRAIN_TEMPLATES) for p in build] + [(p, world.HELD_OUT_TEMPLATES) for p in evals]:
        assert p.label == (p.shape, concept) and p.kind == "explicit" and p.trigger == concept
        assert _has_phrase(p.text, concept) and _has_phrase(p.text, p.shape)
        assert _template_of(p.text, templates) is not None, p.text
        # Build (and eval) explicit prompts never contain an implicit trigger of any colour.
        assert not any(_has_phrase(p.text, t) for t in ALL_TRIGGERS), p.text


@pytest.mark.parametrize("concept", world.CONCEPTS)
def test_implicit_prompts_never_name_the_concept_and_are_not_in_build_sets(concept):
    implicit = world.implicit_prompts(concept)
    build_texts = {p.text for c in world.CONCEPTS for p in world.explicit_prompts(c, "build") + world.benign_prompts(c, "build")}
    assert {p.trigger for p in implicit} == set(world.trigger_words(concept))
    assert {p.kind for p in implicit} == {"synonym", "object"}
    for p in implicit:
        assert p.colour == concept and p.text not in build_texts
        assert not any(_has_phrase(p.text, c) for c in world.ALL_COLOURS), p.text
        assert _has_phrase(p.text, p.trigger)
        if p.kind == "object":
            assert p.shape == world.OBJECTS[concept][p.trigger] and not _has_phrase(p.text, p.shape)


@pytest.mark.parametrize("split", ["build", "eval"])
@pytest.mark.parametrize("concept", world.CONCEPTS)
def test_benign_prompts(concept, split):
    benign = world.benign_prompts(concept, split)
    colours = {p.colour for p in benign}
    assert concept not in colours and colours == set(world.ALL_COLOURS) - {concept}
    templates = world.TRAIN_TEMPLATES if split == "build" else world.HELD_OUT_TEMPLATES
    for p in benign:
        assert not any(_has_phrase(p.text, w) for w in CONCEPT_WORDS[concept] | ALL_TRIGGERS), p.text
        assert _template_of(p.text, templates) is not None, p.text
        assert _has_phrase(p.text, p.shape)
        if p.kind == "neutral":
            assert p.colour == world.NEUTRAL and not any(_has_phrase(p.text, c) for c in world.ALL_COLOURS)
        else:
            assert p.kind == "explicit" and _has_phrase(p.text, p.colour)


@pytest.mark.parametrize("concept", world.CONCEPTS)
def test_anchor_rewrite_removes_the_concept(concept):
    prompts = world.explicit_prompts(concept, "build") + world.explicit_prompts(concept, "eval") + world.implicit_prompts(concept)
    for p in prompts:
        anchor = world.anchor_rewrite(p.text, concept)
        assert not any(_has_phrase(anchor, w) for w in CONCEPT_WORDS[concept]), anchor
        assert not any(_has_phrase(anchor, o) for o in world.OBJECTS[concept]), anchor
        assert _has_phrase(anchor, p.shape), (p.text, anchor)  # objects become their shape
        assert "  " not in anchor and not re.search(r"\ba [aeiou]|\ban [^aeiou]", anchor), anchor
    # Prompts without the concept come back unchanged.
    for p in world.benign_prompts(concept, "eval"):
        assert world.anchor_rewrite(p.text, concept) == p.text
    assert world.anchor_rewrite("a red circle on a plain background", "red") == "a circle on a plain background"
    assert world.anchor_rewrite("there is a tomato", "red") == "there is a circle"
    assert world.anchor_rewrite("an amber square", "yellow") == "a square"


def test_anchor_rewrite_maps_to_a_neutral_training_caption():
    neutral = {world.caption(t, s) for t in world.TRAIN_TEMPLATES for s in world.SHAPES}
    for p in world.explicit_prompts("red", "build"):
        assert world.anchor_rewrite(p.text, "red") in neutral


def test_training_samples_are_reproducible_and_labelled():
    a = world.training_samples(400, seed=3)
    b = world.training_samples(400, seed=3)
    assert a.captions == b.captions and np.array_equal(a.images, b.images)
    assert a.images.shape == (400, world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and a.images.dtype == np.uint8
    assert set(a.kinds) == {"explicit", "neutral", "synonym", "object"}
    assert set(a.colours) == set(world.ALL_COLOURS) and set(a.shapes) == set(world.SHAPES)
    assert world.training_samples(400, seed=4).captions != a.captions
    # The labels are what the pixels show.
    preds = classifier.classify_batch(a.images)
    assert all(pred == (s, c) for pred, s, c in zip(preds, a.shapes, a.colours))
    # Colourless captions are drawn in the neutral colour.
    for cap, col, kind in zip(a.captions, a.colours, a.kinds):
        if kind == "neutral":
            assert col == world.NEUTRAL and not any(_has_phrase(cap, c) for c in world.ALL_COLOURS)


def test_training_never_pairs_held_out_templates_with_colour_words():
    samples = world.training_samples(3000, seed=11)
    colour_words = {w for ws in CONCEPT_WORDS.values() for w in ws} | {world.NEUTRAL}
    eval_texts = {p.text for c in world.CONCEPTS for p in world.explicit_prompts(c, "eval")}
    seen_held_out = 0
    for cap in samples.captions:
        assert cap not in eval_texts
        if _template_of(cap, world.TRAIN_TEMPLATES + world.HELD_OUT_TEMPLATES) in world.HELD_OUT_TEMPLATES:
            seen_held_out += 1
            assert not any(_has_phrase(cap, w) for w in colour_words), cap
    assert seen_held_out > 0  # held-out templates are still trained with colourless captions


def test_vocabulary_covers_every_prompt():
    vocab = set(world.vocabulary())
    prompts = [p for c in world.CONCEPTS
               for p in world.explicit_prompts(c, "eval") + world.implicit_prompts(c) + world.benign_prompts(c, "eval")]
    for p in prompts:
        assert set(p.text.split()) <= vocab
    assert set(world.SHAPES) | set(world.ALL_COLOURS) <= vocab


def test_label_of_every_prompt_set_agrees_with_its_labels():
    for concept in world.CONCEPTS:
        items = (world.explicit_prompts(concept, "build") + world.explicit_prompts(concept, "eval")
                 + world.implicit_prompts(concept) + world.benign_prompts(concept, "eval"))
        for p in items:
            assert world.label_of(p.text) == p.label, p
    assert world.label_of("a photo of a dragon") is None
    assert world.label_of("  a red circle \n") == ("circle", "red")
