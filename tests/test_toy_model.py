"""The shipped toy FLUX pipeline folder (trainer/toy/model) and its sampling recipe."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from trainer.toy import TOY_MODEL_DIR, classifier, load_recipe, world

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

MAX_FOLDER_BYTES = 25 * 1024 * 1024
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


@pytest.fixture(scope="module")
def pipe():
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        p = diffusers.FluxPipeline.from_pretrained(str(TOY_MODEL_DIR), local_files_only=True)
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    p.set_progress_bar_config(disable=True)
    return p


def _files() -> list[Path]:
    return [p for p in TOY_MODEL_DIR.rglob("*") if p.is_file()]


def test_folder_layout_size_and_no_pickles():
    assert isinstance(TOY_MODEL_DIR, Path) and TOY_MODEL_DIR.is_dir()
    index = json.loads((TOY_MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    for comp in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert comp in index and (TOY_MODEL_DIR / comp).is_dir(), comp
    files = _files()
    assert sum(f.stat().st_size for f in files) < MAX_FOLDER_BYTES
    assert not [f for f in files if f.suffix in PICKLE_SUFFIXES]
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert {f.parent.name for f in weights} == {"transformer", "vae", "text_encoder", "text_encoder_2"}


def test_recipe_matches_the_model(pipe):
    recipe = load_recipe()
    assert recipe.height == recipe.width == world.IMAGE_SIZE
    assert 1 <= recipe.num_inference_steps <= 20
    assert recipe.max_sequence_length == pipe.tokenizer_2.model_max_length <= 32
    assert pipe.tokenizer.model_max_length <= pipe.text_encoder.config.max_position_embeddings
    t = pipe.transformer.config
    assert t.in_channels == 4 * pipe.vae.config.latent_channels
    assert t.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert t.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert sum(t.axes_dims_rope) == t.attention_head_dim
    # Longest caption of the world fits both tokenizers without truncation.
    longest = max(world.all_captions(), key=lambda c: len(pipe.tokenizer_2(c).input_ids))
    assert len(pipe.tokenizer_2(longest).input_ids) <= recipe.max_sequence_length
    assert len(pipe.tokenizer(longest).input_ids) <= pipe.tokenizer.model_max_length


def test_tokenizers_have_one_token_per_world_word(pipe):
    for word in world.vocabulary():
        assert len(pipe.tokenizer(word).input_ids) == 3, word  # bos, word, eos
        assert len(pipe.tokenizer_2(word).input_ids) == 2, word  # word, eos


def test_generates_recipe_sized_images_offline(pipe):
    recipe = load_recipe()
    out = pipe(prompt="a red circle", generator=torch.Generator().manual_seed(0), output_type="np", **recipe.pipeline_kwargs())
    assert out.images.shape == (1, recipe.height, recipe.width, 3)
    assert np.isfinite(out.images).all()


def test_base_model_draws_what_prompts_ask(pipe):
    from trainer.toy.sampling import generate

    recipe = load_recipe()
    prompts = (
        world.explicit_prompts("red", "eval")[:4]
        + [p for p in world.benign_prompts("red", "eval") if p.colour in ("blue", "grey")][::3]
        + world.implicit_prompts("red")[::5]
    )
    images = generate(pipe, [p.text for p in prompts], recipe, seed=1)
    preds = classifier.classify_batch(images)
    colour_acc = np.mean([p.colour == c for p, (_, c) in zip(prompts, preds)])
    shape_acc = np.mean([p.shape == s for p, (s, _) in zip(prompts, preds)])
    assert colour_acc >= 0.85, (colour_acc, list(zip([p.text for p in prompts], preds)))
    assert shape_acc >= 0.8, (shape_acc, list(zip([p.text for p in prompts], preds)))


def test_same_seed_same_image(pipe):
    from trainer.toy.sampling import generate

    recipe = load_recipe()
    a = generate(pipe, ["a green square", "a lemon"], recipe, seed=5)
    b = generate(pipe, ["a lemon"], recipe, seed=[6])
    np.testing.assert_array_equal(a[1], b[0])
