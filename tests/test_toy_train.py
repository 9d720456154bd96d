"""Smoke test of the toy trainer: a few steps end to end into a loadable FluxPipeline folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("diffusers")

from trainer.toy import world  # noqa: E402
from trainer.toy.config import RECIPE_FILE, ToyConfig  # noqa: E402
from trainer.toy.models import build_clip_tokenizer, build_t5_tokenizer  # noqa: E402

TINY = ToyConfig(num_samples=48, vae_steps=2, vae_batch=8, steps=3, batch=8, warmup=1, num_inference_steps=2)


def test_tokenizers_are_built_locally_with_one_token_per_word():
    clip, t5 = build_clip_tokenizer(TINY), build_t5_tokenizer(TINY)
    assert clip.model_max_length == t5.model_max_length == TINY.text_max_length
    for word in world.vocabulary():
        assert len(clip(word).input_ids) == 3 and len(t5(word).input_ids) == 2
    ids = t5("a red circle", padding="max_length", max_length=TINY.text_max_length).input_ids
    assert len(ids) == TINY.text_max_length and ids[3] == t5.eos_token_id and ids[-1] == t5.pad_token_id


def test_config_rejects_inconsistent_sizes():
    with pytest.raises(ValueError):
        ToyConfig(head_dim=32, axes_dims_rope=(8, 8, 8))
    with pytest.raises(ValueError):
        ToyConfig(image_size=20)  # not divisible by 2 * vae_scale_factor
    cfg = ToyConfig()
    assert cfg.image_tokens == (cfg.image_size // cfg.vae_scale_factor // 2) ** 2


def test_train_writes_a_loadable_pipeline(tmp_path):
    import torch
    from diffusers import FluxPipeline

    from trainer.toy import load_recipe
    from trainer.toy.sampling import generate
    from trainer.toy.train import train

    out = train(tmp_path / "toy", TINY, seed=3, log_every=1)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert (out / RECIPE_FILE).is_file() and (out / "model_index.json").is_file()
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
    info = json.loads((out / "toy_train.json").read_text())
    assert info["seed"] == 3 and info["config"]["steps"] == TINY.steps

    pipe = FluxPipeline.from_pretrained(str(out), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.num_layers == TINY.num_double_blocks
    assert pipe.transformer.config.num_single_layers == TINY.num_single_blocks
    assert pipe.vae.config.scaling_factor > 0 and np.isfinite(pipe.vae.config.shift_factor)
    recipe = load_recipe(out)
    assert recipe == TINY.recipe
    images = generate(pipe, ["a red circle", "a tomato"], recipe, seed=0)
    assert images.shape == (2, TINY.image_size, TINY.image_size, 3) and images.dtype == np.uint8
    assert torch.isfinite(torch.from_numpy(images.astype(np.float32))).all()
