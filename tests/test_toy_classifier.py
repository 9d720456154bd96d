"""The deterministic pixel classifier of the toy world (trainer.toy.classifier)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from trainer.toy import classifier, world


def _random_renders(n: int, seed: int) -> tuple[np.ndarray, list[tuple[str, str]]]:
    rng = np.random.default_rng(seed)
    labels = [(world.SHAPES[rng.integers(len(world.SHAPES))], world.ALL_COLOURS[rng.integers(len(world.ALL_COLOURS))])
              for _ in range(n)]
    images = np.stack([world.render(s, c, rng) for s, c in labels])
    return images, labels


@pytest.mark.parametrize("seed", [0, 1])
def test_accuracy_on_ground_truth_renders(seed):
    images, labels = _random_renders(600, seed)
    preds = classifier.classify_batch(images)
    shape_acc = np.mean([p[0] == t[0] for p, t in zip(preds, labels)])
    colour_acc = np.mean([p[1] == t[1] for p, t in zip(preds, labels)])
    assert shape_acc >= 0.99, shape_acc
    assert colour_acc >= 0.99, colour_acc


def test_every_shape_and_colour_at_extreme_sizes():
    size = world.IMAGE_SIZE
    for shape in world.SHAPES:
        for colour in world.ALL_COLOURS:
            for side in (0.45 * size, 0.7 * size):
                img = world.draw(shape, world.PALETTE[colour], world.ShapeParams(size / 2 + 0.3, size / 2 - 0.2, side))
                assert classifier.classify(img) == (shape, colour)


def test_robust_to_noise_and_blur():
    images, labels = _random_renders(300, 2)
    rng = np.random.default_rng(0)
    noisy = np.clip(images + rng.normal(0, 8, images.shape), 0, 255).astype(np.uint8)
    half, full = (world.IMAGE_SIZE // 2,) * 2, (world.IMAGE_SIZE,) * 2
    blurred = np.stack([np.asarray(Image.fromarray(im).resize(half, Image.BILINEAR).resize(full, Image.BILINEAR))
                        for im in images])
    for batch in (noisy, blurred):
        preds = classifier.classify_batch(batch)
        assert np.mean([p == t for p, t in zip(preds, labels)]) >= 0.95


def test_empty_image_is_none():
    blank = np.full((world.IMAGE_SIZE, world.IMAGE_SIZE, 3), world.BACKGROUND, dtype=np.uint8)
    assert classifier.classify(blank) == (classifier.NONE, classifier.NONE)
    speck = blank.copy()
    speck[5, 5] = (200, 0, 0)  # a single pixel is not a shape
    assert classifier.classify(speck) == (classifier.NONE, classifier.NONE)


def test_accepts_pil_float_and_rgba():
    img = world.render("triangle", "blue", 5)
    assert classifier.classify(Image.fromarray(img)) == ("triangle", "blue")
    assert classifier.classify(img.astype(np.float32) / 255.0) == ("triangle", "blue")
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    assert classifier.classify(rgba) == ("triangle", "blue")
    with pytest.raises(ValueError):
        classifier.classify(np.zeros((8, 8), np.uint8))


def test_details_are_consistent():
    img = world.render("circle", "grey", 9)
    det = classifier.classify_detailed(img)
    assert det.label == ("circle", "grey") and det.iou > 0.85 and 0.05 < det.area < 0.5
    assert np.abs(np.asarray(det.rgb) - world.PALETTE["grey"]).max() < 20
