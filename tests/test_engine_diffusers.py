"""The reversible diffusers integration on a tiny FluxTransformer2DModel (every family: test_engine_families.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers integration needs diffusers (pip install .[trainer])")
from diffusers import FluxTransformer2DModel  # noqa: E402
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor  # noqa: E402

from saferope_engine import HookNotRunError, IncompatibleAdapterError, ModelShapes  # noqa: E402
from saferope_engine.diffusers import apply_saferope, model_shapes, observe_qk  # noqa: E402
from saferope_engine.testing import random_adapter  # noqa: E402

CFG = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
           num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
B, L_IMG, L_TXT = 2, 16, 7


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FluxTransformer2DModel(**CFG).eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(L_IMG, 3)
    ids[:, 1] = torch.arange(L_IMG) // 4
    ids[:, 2] = torch.arange(L_IMG) % 4
    return dict(hidden_states=torch.randn(B, L_IMG, 8, generator=g),
                encoder_hidden_states=torch.randn(B, L_TXT, 32, generator=g),
                pooled_projections=torch.randn(B, 16, generator=g), timestep=torch.tensor([0.7] * B),
                img_ids=ids, txt_ids=torch.zeros(L_TXT, 3), return_dict=False)


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def adapter(threshold=0.0, seed=0, **kw):
    shapes = flux_shapes_of_cfg()
    return random_adapter(**shapes, rank=3, threshold=threshold, seed=seed, scale=1.5,
                          blocks=kw.pop("blocks", [("double", 1), ("single", 0), ("single", 1)]),
                          heads=kw.pop("heads", [0, 3]), **kw)


def flux_shapes_of_cfg():
    return dict(num_heads=CFG["num_attention_heads"], head_dim=CFG["attention_head_dim"],
                model_blocks={"double": CFG["num_layers"], "single": CFG["num_single_layers"]})


def processors(model):
    return dict(model.attn_processors)


def hooks(model) -> int:
    """Forward (pre-)hooks anywhere in the model."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_model_shapes(model):
    assert model_shapes(model) == ModelShapes(arch="flux1", num_heads=4, head_dim=16, blocks={"double": 2, "single": 2})


def test_patch_changes_output_and_remove_restores_bit_for_bit(model, inputs):
    before_procs = processors(model)
    base = run(model, inputs)
    handle = apply_saferope(model, adapter(threshold=0.0))
    assert processors(model) == before_procs  # no processor is replaced: hooks on the QK-norm modules
    patched = run(model, inputs)
    assert not torch.equal(patched, base)
    handle.remove()
    assert processors(model) == before_procs  # the same processor objects
    assert all(type(p) is FluxAttnProcessor for p in processors(model).values())
    assert torch.equal(run(model, inputs), base)
    assert hooks(model) == 0


def test_no_gated_token_equals_base_bit_for_bit(model, inputs):
    base = run(model, inputs)
    with apply_saferope(model, adapter(threshold=0.99)):
        assert torch.equal(run(model, inputs), base)
    with apply_saferope(model, adapter(threshold=0.0), strength=0.0):
        assert torch.equal(run(model, inputs), base)


def test_gated_tokens_matter_and_strength_scales(model, inputs):
    base = run(model, inputs)
    with apply_saferope(model, adapter(threshold=0.0), strength=0.5):
        half = run(model, inputs)
    with apply_saferope(model, adapter(threshold=0.0), strength=1.0):
        full = run(model, inputs)
    assert 0 < (half - base).abs().max() < (full - base).abs().max()


def test_stacking_applies_adapters_in_order(model, inputs):
    a1, a2 = adapter(seed=1), adapter(seed=2, blocks=[("single", 0), ("double", 0)], heads=[1, 2, 3])
    raw, got = {}, {}

    def keep(store):
        return lambda kind, i, which, x, t, img_first: store.__setitem__((kind, i, which, x.shape[2]), (x.clone(), t))

    with observe_qk(model, keep(raw)):
        run(model, inputs)
    with apply_saferope(model, a1):
        with apply_saferope(model, a2):
            with observe_qk(model, keep(got)):
                out12 = run(model, inputs)
    # Observers see the q/k after the adapters. Re-derive them with the engine from the raw inputs
    # of the first block only (later blocks' inputs depend on earlier patched blocks).
    for which in ("q", "k"):
        x, t = raw[("double", 0, which, L_TXT)]  # the text stream of double block 0
        assert t == L_TXT
        x12 = a2.apply("double", 0, which, a1.apply("double", 0, which, x, txt_len=t), txt_len=t)
        assert torch.equal(got[("double", 0, which, L_TXT)][0], x12)
    with apply_saferope(model, a2):
        with apply_saferope(model, a1):
            out21 = run(model, inputs)
    assert not torch.allclose(out12, out21)
    assert all(type(p) is FluxAttnProcessor for p in processors(model).values())


def test_single_blocks_get_the_text_length_of_the_call(model, inputs):
    seen = {}
    with observe_qk(model, lambda kind, i, which, x, t, img_first: seen.__setitem__((kind, i, which, t), x.shape)):
        run(model, inputs)
        short = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"][:, :3], txt_ids=torch.zeros(3, 3))
        run(model, short)
    assert seen[("single", 1, "q", 3)] == torch.Size([B, 4, 3 + L_IMG, 16])  # joint, text first
    assert seen[("single", 1, "k", L_TXT)] == torch.Size([B, 4, L_TXT + L_IMG, 16])
    assert seen[("double", 0, "q", 3)] == torch.Size([B, 4, 3, 16])  # the text stream alone
    assert seen[("double", 0, "k", 0)] == torch.Size([B, 4, L_IMG, 16])  # the image stream alone


def test_incompatible_adapter_raises_before_any_change(model):
    before = processors(model)
    wrong = random_adapter(num_heads=4, head_dim=16, model_blocks={"double": 19, "single": 38}, rank=2,
                           blocks=[("double", 0)])
    with pytest.raises(IncompatibleAdapterError, match="double blocks: adapter 19, model 2"):
        apply_saferope(model, wrong)
    assert processors(model) == before and hooks(model) == 0


def test_foreign_processor_that_skips_the_norm_fails_closed(model, inputs):
    """A processor that never calls the QK-norm modules leaves the adapter unapplied: the call raises."""

    class SkipAttention:  # e.g. a cache returning an earlier result instead of attending
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
            return hidden_states

    attn = model.single_transformer_blocks[1].attn
    old = attn.processor
    handle = apply_saferope(model, adapter())
    attn.set_processor(SkipAttention())
    try:
        with pytest.raises(HookNotRunError, match=r"single\.1\.q:joint"):
            run(model, inputs)
    finally:
        attn.set_processor(old)
        handle.remove()
    assert hooks(model) == 0


def test_handles_can_be_removed_in_any_order(model, inputs):
    base = run(model, inputs)
    a1, a2 = adapter(seed=1), adapter(seed=2)
    h1, h2 = apply_saferope(model, a1), apply_saferope(model, a2)
    h1.remove()  # a2 alone is left
    with apply_saferope(model, a2):
        pass
    only2 = run(model, inputs)
    h2.remove()
    with apply_saferope(model, a2):
        assert torch.equal(run(model, inputs), only2)
    assert torch.equal(run(model, inputs), base) and hooks(model) == 0


def test_bypass_runs_base_model_and_gradients_reach_generators(model, inputs):
    base = run(model, inputs)
    a = adapter(threshold=0.0)
    blk = a.block("single", 0)
    W = torch.zeros_like(blk.A_txt, requires_grad=True)
    a_train = type(a)(a.meta, list(a.blocks.values()), validate=False)
    blk.A_txt = blk.A_txt.detach() + (W - W.transpose(-1, -2))
    model.requires_grad_(False)  # frozen backbone, as in training
    try:
        with apply_saferope(model, a_train) as handle:
            with handle.bypassed():
                assert torch.equal(run(model, inputs), base)
            out = model(**inputs)[0]
            out.square().mean().backward()
    finally:
        model.requires_grad_(True)
    assert W.grad is not None and W.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_gradient_checkpointing_recomputes_with_each_calls_text_length(model, inputs):
    """Two forwards with different text lengths, one backward: each recomputed block must see its own split."""
    a = adapter(threshold=0.0)
    params = {}
    for key, blk in a.blocks.items():
        W = torch.zeros_like(blk.A_txt, requires_grad=True)
        params[key] = W
        blk.A_txt = blk.A_txt.detach() + (W - W.transpose(-1, -2))
    train_adapter = type(a)(a.meta, list(a.blocks.values()), validate=False)
    short = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"][:, :3], txt_ids=torch.zeros(3, 3))

    def loss_and_grads(checkpointing: bool):
        for W in params.values():
            W.grad = None
        model.requires_grad_(False)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        try:
            with apply_saferope(model, train_adapter):
                loss = model(**inputs)[0].square().mean() + model(**short)[0].abs().mean()
                loss.backward()
        finally:
            model.eval()
            if checkpointing:
                model.disable_gradient_checkpointing()
            model.requires_grad_(True)
        return loss.detach(), {k: W.grad.clone() for k, W in params.items()}

    l_plain, g_plain = loss_and_grads(False)
    l_ckpt, g_ckpt = loss_and_grads(True)
    assert torch.allclose(l_plain, l_ckpt)
    for key in g_plain:
        assert g_plain[key].abs().sum() > 0
        assert torch.allclose(g_plain[key], g_ckpt[key], atol=1e-6), key
