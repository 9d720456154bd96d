"""The reversible diffusers integration on a tiny FluxTransformer2DModel."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers integration needs diffusers (pip install .[trainer])")
from diffusers import FluxTransformer2DModel  # noqa: E402
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor  # noqa: E402

from saferope_engine import HookNotRunError, IncompatibleAdapterError, SafeRoPEError  # noqa: E402
from saferope_engine.diffusers import apply_saferope, flux_shapes, observe_qk  # noqa: E402
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
                          blocks=kw.pop("blocks", [("double", 1), ("single", 0), ("single", 1)]), heads=kw.pop("heads", [0, 3]), **kw)


def flux_shapes_of_cfg():
    return dict(num_heads=CFG["num_attention_heads"], head_dim=CFG["attention_head_dim"],
                num_double_blocks=CFG["num_layers"], num_single_blocks=CFG["num_single_layers"])


def processors(model):
    return dict(model.attn_processors)


def test_flux_shapes(model):
    assert flux_shapes(model) == flux_shapes_of_cfg()


def test_patch_changes_output_and_remove_restores_bit_for_bit(model, inputs):
    before_procs = processors(model)
    base = run(model, inputs)
    handle = apply_saferope(model, adapter(threshold=0.0))
    patched = run(model, inputs)
    assert not torch.equal(patched, base)
    handle.remove()
    assert processors(model) == before_procs  # the same processor objects
    assert all(type(p) is FluxAttnProcessor for p in processors(model).values())
    assert torch.equal(run(model, inputs), base)
    assert model._forward_pre_hooks == {} and model._forward_hooks == {}


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
    with observe_qk(model, lambda kind, i, q, k, t: raw.__setitem__((kind, i), (q.clone(), k.clone(), t))):
        run(model, inputs)
    with apply_saferope(model, a1):
        with apply_saferope(model, a2):
            with observe_qk(model, lambda kind, i, q, k, t: got.__setitem__((kind, i), (q.clone(), k.clone()))):
                out12 = run(model, inputs)
    # Observers see the q/k after the adapters. Re-derive them with the engine from the raw inputs
    # of the first block only (later blocks' inputs depend on earlier patched blocks).
    q, k, t = raw[("double", 0)]
    q1, k1 = a1.apply_qk("double", 0, q, k, txt_len=t)
    q12, k12 = a2.apply_qk("double", 0, q1, k1, txt_len=t)
    assert t == L_TXT
    assert torch.equal(got[("double", 0)][0], q12) and torch.equal(got[("double", 0)][1], k12)
    with apply_saferope(model, a2):
        with apply_saferope(model, a1):
            out21 = run(model, inputs)
    assert not torch.allclose(out12, out21)
    assert all(type(p) is FluxAttnProcessor for p in processors(model).values())


def test_single_blocks_get_the_text_length_of_the_call(model, inputs):
    seen = {}
    with observe_qk(model, lambda kind, i, q, k, t: seen.__setitem__((kind, i), (t, q.shape))):
        run(model, inputs)
        short = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"][:, :3], txt_ids=torch.zeros(3, 3))
        run(model, short)
    assert seen[("single", 1)] == (3, torch.Size([B, 4, 3 + L_IMG, 16]))
    assert seen[("double", 0)] == (3, torch.Size([B, 4, 3 + L_IMG, 16]))


def test_incompatible_adapter_raises_before_any_change(model):
    before = processors(model)
    wrong = random_adapter(num_heads=4, head_dim=16, num_double_blocks=19, num_single_blocks=38, rank=2,
                           blocks=[("double", 0)])
    with pytest.raises(IncompatibleAdapterError, match="num_double_blocks: adapter 19, model 2"):
        apply_saferope(model, wrong)
    assert processors(model) == before and model._forward_pre_hooks == {}


def test_foreign_processor_is_refused(model):
    from diffusers.models.attention_processor import AttnProcessor2_0
    attn = model.single_transformer_blocks[0].attn
    old = attn.processor
    attn.set_processor(AttnProcessor2_0())
    try:
        before = processors(model)
        with pytest.raises(SafeRoPEError, match="single block 0 runs AttnProcessor2_0"):
            apply_saferope(model, adapter())
        assert processors(model) == before
    finally:
        attn.set_processor(old)


def test_replaced_processor_fails_closed(model, inputs):
    handle = apply_saferope(model, adapter())
    attn = model.single_transformer_blocks[1].attn
    patched = attn.processor
    attn.set_processor(FluxAttnProcessor())  # someone swapped it behind our back
    try:
        with pytest.raises(HookNotRunError, match=r"\['single.1'\] did not run"):
            run(model, inputs)
        with pytest.raises(SafeRoPEError, match="processor was replaced"):
            handle.remove()
    finally:
        attn.set_processor(patched)
        handle.remove()
    assert all(type(p) is FluxAttnProcessor for p in processors(model).values())


def test_out_of_order_removal_is_refused(model):
    h1 = apply_saferope(model, adapter(seed=1))
    h2 = apply_saferope(model, adapter(seed=2))
    with pytest.raises(SafeRoPEError, match="remove later SafeRoPE handles first"):
        h1.remove()
    h2.remove()
    h1.remove()
    assert all(type(p) is FluxAttnProcessor for p in processors(model).values())


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
