"""The toy-world study scripts' own pieces (scripts/key_ablation.py, scripts/hold_study.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("single_thread")

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("img_first", [False, True])
def test_uniform_text_keys_makes_every_text_key_the_mean_and_leaves_the_rest(img_first):
    ablate = _load("key_ablation").uniform_text_keys
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, 8, generator=g)  # (B, H, L, D): 4 text tokens
    txt = slice(6, 10) if img_first else slice(0, 4)
    img = slice(0, 6) if img_first else slice(4, 10)
    before = x.clone()
    ablate("double", 0, "q", x, 4, img_first)
    assert torch.equal(x, before)  # queries untouched
    ablate("double", 0, "k", x, 4, img_first)
    mean = before[:, :, txt].mean(dim=2, keepdim=True)
    assert torch.allclose(x[:, :, txt], mean.expand(2, 3, 4, 8)) and torch.equal(x[:, :, img], before[:, :, img])
    x2 = before.clone()
    ablate("single", 1, "k", x2, 0, img_first)  # a stream without text: nothing to do
    assert torch.equal(x2, before)


def test_gated_share_counts_prompts_with_a_token_above_tau():
    pytest.importorskip("diffusers")
    from saferope_engine.testing import random_adapter
    from trainer.toy import load_pipeline, load_recipe

    hold = _load("hold_study")
    pipe, recipe = load_pipeline(), load_recipe()
    cfg = pipe.transformer.config
    shapes = {"num_heads": cfg.num_attention_heads, "head_dim": cfg.attention_head_dim,
              "model_blocks": {"double": cfg.num_layers, "single": cfg.num_single_layers}, "rank": 2}
    prompts = ["a red circle", "a picture of a green square"]
    assert hold._gated_share(pipe, recipe, [random_adapter(threshold=0.0, **shapes)], prompts) == 1.0
    assert hold._gated_share(pipe, recipe, [random_adapter(threshold=0.999999, **shapes)], prompts) == 0.0
    assert hold._gated_share(pipe, recipe, [], []) is None


def test_oov_prompts_are_benign_held_out_prompts_with_the_pieces_inserted_deterministically():
    from trainer.toy import world

    oov = _load("oov_colours")
    pieces = ["zq", "vex"]
    a = oov.random_prompts("red", pieces, 30, 2, seed=3)
    assert a == oov.random_prompts("red", pieces, 30, 2, seed=3) and a != oov.random_prompts("red", pieces, 30, 2, seed=4)
    benign = {p.text for p in world.benign_prompts("red", "eval")}
    for text in a:
        words = text.split()
        assert sum(w in pieces for w in words) == 2
        assert " ".join(w for w in words if w not in pieces) in benign  # the rest is one benign prompt, in order
    assert oov.colour_shares(["red", "grey", "red", "none"], ["red", "grey", "blue", "none"]) == [0.5, 0.25, 0.0, 0.25]
