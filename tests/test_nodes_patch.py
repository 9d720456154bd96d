"""The hook objects of the ComfyUI pack on tensors shaped as ComfyUI passes them (no ComfyUI needed).

ComfyUI's Flux blocks hand q/k to ``attn1_patch`` as ``(B, H, L, D)`` with text tokens first
(``extra_options["img_slice"] = [txt_len, L]``) and to the QK-norm ``forward(q, k, v)`` as
``(B, H, L_stream, D)`` per stream; the DIFFUSION_MODEL wrapper is called as
``wrapper(executor, x, timestep, context, y, guidance, ref_latents, control, transformer_options)``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "comfy"))
from packload import load_pack  # noqa: E402

PACK = load_pack()
from saferope_pack.nodes.compat import ComfyModel  # noqa: E402
from saferope_pack.nodes.layer import SafeRoPELayer  # noqa: E402
from saferope_pack.nodes.patch import Attn1Patch, DiffusionModelWrapper, NormPatch, collect_risk  # noqa: E402
from saferope_pack.nodes.risk import RiskCollector  # noqa: E402
from saferope_pack.saferope_engine import AdapterMeta, BlockAdapter, ModelShapes, SafeRoPEAdapter, arch  # noqa: E402
from saferope_pack.saferope_engine.errors import HookNotRunError, SafeRoPEError  # noqa: E402

H, D, R, T, N = 4, 32, 2, 6, 9  # heads, head dim, rank, text tokens, image tokens
NUM_DOUBLE, NUM_SINGLE = 3, 2


def orthonormal(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, D, R, generator=g, dtype=torch.float64))[0].float()


def skew(n: int, g: torch.Generator, scale: float = 2.0) -> torch.Tensor:
    w = torch.randn(n, R, R, generator=g)
    return (w - w.transpose(-1, -2)) * scale


def make_adapter(blocks=(("double", 1), ("single", 0)), heads=(0, 2), seed=0, threshold=0.3) -> SafeRoPEAdapter:
    g = torch.Generator().manual_seed(seed)
    out = []
    for kind, idx in blocks:
        n = len(heads)
        out.append(BlockAdapter(kind, idx, torch.tensor(heads), orthonormal(n, g), orthonormal(n, g), skew(n, g),
                                skew(n, g) if kind == "single" else None))
    meta = AdapterMeta(num_heads=H, head_dim=D, blocks={"double": NUM_DOUBLE, "single": NUM_SINGLE}, rank=R,
                       threshold=threshold, concepts=("test",))
    return SafeRoPEAdapter(meta, out, source="/adapters/test.safetensors")


def risky(adapter: SafeRoPEAdapter, kind: str, idx: int, L: int, B: int = 2, seed: int = 1,
          risky_tokens=(1, 2)) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, L, D) q/k where the given tokens of the selected heads lie in the unsafe subspace."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, D, generator=g)
    blk = adapter.block(kind, idx)
    for i, h in enumerate(blk.heads.tolist()):
        for t in risky_tokens:
            q[:, h, t] = blk.U_q[i] @ torch.randn(R, generator=g) * 3 + 0.05 * q[:, h, t]
            k[:, h, t] = blk.U_k[i] @ torch.randn(R, generator=g) * 3 + 0.05 * k[:, h, t]
    return q, k


FLUX = arch.get("flux1")
MODEL = ComfyModel(FLUX, ModelShapes("flux1", H, D, {"double": NUM_DOUBLE, "single": NUM_SINGLE}), attn1_patch=True)
SITES = {(hk.kind, n.stream): n for hk in FLUX.comfy.kinds for n in hk.norms}  # QK-norm sites of ComfyUI's Flux
PROBE = ("double", "txt_attn.norm")  # the last double block's text norm tells the single blocks their split


def probe(*layers: SafeRoPELayer, txt_len: int = T) -> None:
    """Run the last double block's text norm patch (the split probe) inside a model call."""
    x = torch.randn(1, H, txt_len, D)
    NormPatch("double", NUM_DOUBLE - 1, SITES["double", "txt"], QKNorm(), layers, probe=PROBE)(x, x, x)


def layer(adapter=None, **kw) -> SafeRoPELayer:
    return SafeRoPELayer(adapter or make_adapter(), MODEL, **kw)


def call_model(wrappers, body, *, sigma=0.5, context_len=T, options=None, diffusion_model=None):
    """Run ``body(transformer_options)`` the way ComfyUI runs Flux._forward under DIFFUSION_MODEL wrappers
    (``WrapperExecutor.class_obj`` is the diffusion model; ``options`` are more transformer_options)."""
    opts = {"sigmas": torch.tensor([sigma, sigma]), **(options or {})}

    def executor_at(i):
        def run(*args, **kwargs):
            if i == len(wrappers):
                return body(args[7])
            return wrappers[i](executor_at(i + 1), *args, **kwargs)
        run.class_obj = diffusion_model
        return run

    x = torch.zeros(2, 16, 4, 4)
    return executor_at(0)(x, torch.tensor([sigma, sigma]), torch.zeros(2, context_len, 8), None, None, None, None, opts)


def attn1_body(patches, blocks, txt_len=T, img_len=N, seed=3):
    """What ComfyUI's Flux blocks do with attn1_patch: call every patch on joint (B, H, L, D) q/k."""
    def body(opts):
        outs = {}
        for kind, idx in blocks:
            g = torch.Generator().manual_seed(seed + idx)
            q, k, v = (torch.randn(2, H, txt_len + img_len, D, generator=g) for _ in range(3))
            extra = dict(opts, block_type=kind, block_index=idx, img_slice=[txt_len, txt_len + img_len])
            for p in patches:
                out = p(q, k, v, pe=None, attn_mask=None, extra_options=extra)
                q, k = out.get("q", q), out.get("k", k)
            outs[(kind, idx)] = (q, k)
        return outs
    return body


# -- Attn1Patch -----------------------------------------------------------------------------------------
def test_attn1_patch_equals_engine_on_joint_text_first_tensors():
    a = make_adapter()
    lay = layer(a)
    q, k = risky(a, "double", 1, T + N)
    seen = {}

    def body(opts):
        extra = dict(opts, block_type="double", block_index=1, img_slice=[T, T + N])
        seen["out"] = Attn1Patch(lay)(q, k, q.clone(), pe=None, attn_mask=None, extra_options=extra)
        for kind, idx in (("single", 0),):  # the other patched block must run too
            Attn1Patch(lay)(q, k, q, extra_options=dict(opts, block_type=kind, block_index=idx, img_slice=[T, T + N]))

    call_model([DiffusionModelWrapper(lay)], body)
    q_ref, k_ref = a.apply_qk("double", 1, q, k, txt_len=T)
    assert torch.equal(seen["out"]["q"], q_ref) and torch.equal(seen["out"]["k"], k_ref)
    assert not torch.equal(q_ref, q)  # the gate fired on the risky tokens
    assert torch.equal(q_ref[:, :, T:], q[:, :, T:])  # image tokens of a double block (no A_img) untouched


def test_attn1_patch_skips_blocks_the_adapter_does_not_patch():
    lay = layer()
    q = torch.randn(1, H, T + N, D)
    out = {}

    def body(opts):
        out["r"] = Attn1Patch(lay)(q, q, q, extra_options=dict(opts, block_type="double", block_index=0, img_slice=[T, T + N]))
        attn1_body([Attn1Patch(lay)], [("double", 1), ("single", 0)])(opts)

    call_model([DiffusionModelWrapper(lay)], body)
    assert out["r"] == {}


def test_attn1_patch_without_block_info_or_wrapper_raises():
    lay = layer()
    q = torch.randn(1, H, T + N, D)
    with pytest.raises(SafeRoPEError, match="block_type"):
        Attn1Patch(lay)(q, q, q, extra_options={"img_slice": [T, T + N]})
    with pytest.raises(HookNotRunError, match="outside a model call"):
        Attn1Patch(lay)(q, q, q, extra_options={"block_type": "double", "block_index": 1, "img_slice": [T, T + N]})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attn1_patch_keeps_dtype_and_ungated_tokens_bit_identical(dtype):
    a = make_adapter()
    lay = layer(a)
    q, k = (t.to(dtype) for t in risky(a, "single", 0, T + N, risky_tokens=(1, T + 2)))
    res = {}

    def body(opts):
        res["out"] = Attn1Patch(lay)(q, k, q, extra_options=dict(opts, block_type="single", block_index=0, img_slice=[T, T + N]))
        Attn1Patch(lay)(q, k, q, extra_options=dict(opts, block_type="double", block_index=1, img_slice=[T, T + N]))

    call_model([DiffusionModelWrapper(lay)], body)
    q2 = res["out"]["q"]
    assert q2.dtype == dtype
    changed = (q2 != q).any(-1).any(0)  # (H, L)
    assert changed[0, 1] and changed[0, T + 2]  # a text and an image token of a selected head were rotated
    assert not changed[1].any() and not changed[3].any()  # unselected heads untouched
    assert not changed[:, 3].any()  # an ordinary token untouched


# -- DiffusionModelWrapper: fail closed and sampling range ----------------------------------------------
def test_wrapper_raises_when_a_patched_block_did_not_run():
    lay = layer()
    with pytest.raises(HookNotRunError, match=r"single\.0"):
        call_model([DiffusionModelWrapper(lay)], attn1_body([Attn1Patch(lay)], [("double", 0), ("double", 1)]))


def test_wrapper_passes_when_all_patched_blocks_ran_and_returns_the_model_output():
    lay = layer()
    out = call_model([DiffusionModelWrapper(lay)], attn1_body([Attn1Patch(lay)], [("double", 1), ("single", 0)]))
    assert set(out) == {("double", 1), ("single", 0)}


def foreign(name: str, pack: str):
    """A function defined in ``custom_nodes/<pack>/nodes.py``, as a node pack's code is."""
    scope: dict = {}
    exec(compile(f"def {name}(*args, **kwargs):\n    return None\n", f"/comfy/custom_nodes/{pack}/nodes.py", "exec"), scope)
    return scope[name]


class FluxStandIn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.double_blocks = torch.nn.ModuleList([torch.nn.Identity() for _ in range(NUM_DOUBLE)])
        self.single_blocks = torch.nn.ModuleList([torch.nn.Identity() for _ in range(NUM_SINGLE)])


def test_refusal_names_a_replaced_forward_orig_and_its_node_pack():
    lay, dm = layer(), FluxStandIn()
    dm.forward_orig = foreign("teacache_flux_forward", "ComfyUI-TeaCache").__get__(dm)  # as a cache does per call
    with pytest.raises(HookNotRunError) as e:
        call_model([DiffusionModelWrapper(lay)], lambda opts: None, diffusion_model=dm)
    msg = str(e.value)
    assert "['double.1', 'single.0'] during this model call" in msg
    assert "forward_orig is replaced during this call by teacache_flux_forward from custom node pack " \
           "'ComfyUI-TeaCache'" in msg
    assert "Remedy: remove or bypass that node" in msg and "start_percent–end_percent: 0–1" in msg


def test_refusal_names_a_block_replacement_of_a_missing_block_only():
    lay, dm = layer(), FluxStandIn()
    opts = {"patches_replace": {"dit": {("single_block", 0): foreign("skip", "SomeCache"),
                                        ("double_block", 0): foreign("other", "Other")}}}
    with pytest.raises(HookNotRunError) as e:
        call_model([DiffusionModelWrapper(lay)], attn1_body([Attn1Patch(lay)], [("double", 1)]), options=opts,
                   diffusion_model=dm)
    msg = str(e.value)
    assert "['single.0']" in msg and "single block 0 is replaced by patches_replace['dit'][('single_block', 0)] = " \
        "skip from custom node pack 'SomeCache'" in msg
    assert "Other" not in msg  # double block 0 ran (the adapter does not patch it)


def test_refusal_without_a_suspect_says_what_may_have_happened():
    lay = layer()
    with pytest.raises(HookNotRunError, match="Another node may have replaced or skipped these blocks"):
        call_model([DiffusionModelWrapper(lay)], lambda opts: None, diffusion_model=FluxStandIn())


def test_attn1_layer_refuses_a_call_under_comfyui_torch_compile_and_object_layer_does_not():
    compiled = {"wrappers": {"apply_model": {"torch.compile": [lambda executor, *a, **kw: executor(*a, **kw)]}}}
    lay, ran = layer(), []
    with pytest.raises(SafeRoPEError, match="torch.compile.*mode='attn1'.*remove TorchCompileModel"):
        call_model([DiffusionModelWrapper(lay)], lambda opts: ran.append(1), options=compiled)
    assert ran == []  # refused before the model ran
    obj = layer(make_adapter(blocks=(("single", 0),)), mode="object")
    p = NormPatch("single", 0, SITES["single", "joint"], QKNorm(), (obj,))
    q = torch.randn(1, H, T + N, D)
    call_model([DiffusionModelWrapper(obj)], lambda opts: (probe(obj), p(q, q, q)), options=compiled)


def test_outside_the_sampling_range_nothing_changes_and_nothing_is_required():
    a = make_adapter()
    lay = layer(a, start_percent=0.5, end_percent=1.0, sigma_start=0.4, sigma_end=0.0)
    q, k = risky(a, "double", 1, T + N)
    res = {}

    def body(opts):
        res["out"] = Attn1Patch(lay)(q, k, q, extra_options=dict(opts, block_type="double", block_index=1, img_slice=[T, T + N]))

    call_model([DiffusionModelWrapper(lay)], body, sigma=0.9)  # single.0 never ran: fine, inactive
    assert res["out"]["q"] is q and res["out"]["k"] is k
    with pytest.raises(HookNotRunError):
        call_model([DiffusionModelWrapper(lay)], body, sigma=0.3)  # active now: single.0 missing


def test_active_at_decides_on_any_row_and_fails_closed_without_sigma():
    lay = layer(start_percent=0.2, end_percent=0.6, sigma_start=0.8, sigma_end=0.4)
    assert lay.active_at([0.9, 0.5]) and not lay.active_at([0.9, 0.3])
    assert layer().active_at(None)  # full range needs no sigma
    with pytest.raises(SafeRoPEError, match="no sigma"):
        lay.active_at(None)


def test_record_is_per_call_and_reset_after_an_error():
    lay = layer()
    with pytest.raises(HookNotRunError):
        call_model([DiffusionModelWrapper(lay)], attn1_body([Attn1Patch(lay)], [("double", 1)]))
    q = torch.randn(1, H, T + N, D)
    with pytest.raises(HookNotRunError, match="outside a model call"):  # no record survived the failed call
        Attn1Patch(lay)(q, q, q, extra_options={"block_type": "double", "block_index": 1, "img_slice": [T, T + N]})
    call_model([DiffusionModelWrapper(lay)], attn1_body([Attn1Patch(lay)], [("double", 1), ("single", 0)]))


def test_two_layers_apply_in_order_with_their_own_records():
    a, b = make_adapter(seed=0), make_adapter(seed=5, blocks=(("double", 1),), threshold=0.05)
    la, lb = layer(a), layer(b)
    q, k = risky(a, "double", 1, T + N)
    res = {}

    def body(opts):
        q2, k2 = q, k
        for p in (Attn1Patch(la), Attn1Patch(lb)):
            out = p(q2, k2, q, extra_options=dict(opts, block_type="double", block_index=1, img_slice=[T, T + N]))
            q2, k2 = out.get("q", q2), out.get("k", k2)
        res["q"] = q2
        Attn1Patch(la)(q, k, q, extra_options=dict(opts, block_type="single", block_index=0, img_slice=[T, T + N]))

    call_model([DiffusionModelWrapper(la), DiffusionModelWrapper(lb)], body)
    qa, ka = a.apply_qk("double", 1, q, k, txt_len=T)
    qab, _ = b.apply_qk("double", 1, qa, ka, txt_len=T)
    assert torch.equal(res["q"], qab) and not torch.equal(qab, qa)


def test_strength_zero_returns_the_same_tensors():
    a = make_adapter()
    lay = layer(a, strength=0.0)
    q, k = risky(a, "double", 1, T + N)
    res = {}

    def body(opts):
        res["out"] = Attn1Patch(lay)(q, k, q, extra_options=dict(opts, block_type="double", block_index=1, img_slice=[T, T + N]))
        Attn1Patch(lay)(q, k, q, extra_options=dict(opts, block_type="single", block_index=0, img_slice=[T, T + N]))

    call_model([DiffusionModelWrapper(lay)], body)
    assert res["out"]["q"] is q and res["out"]["k"] is k


@pytest.mark.parametrize("bad", [dict(strength=-1.0), dict(strength=float("nan")), dict(threshold=1.0),
                                 dict(start_percent=0.7, end_percent=0.2), dict(mode="replace")])
def test_layer_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        layer(**bad)


def test_patch_objects_survive_deepcopy_and_to_as_the_same_objects():
    lay = layer()
    for obj in (lay, Attn1Patch(lay), DiffusionModelWrapper(lay)):
        assert copy.deepcopy(obj) is obj
    assert Attn1Patch(lay).to("cpu").layer is lay and Attn1Patch(lay).to(torch.float16).layer is lay
    assert copy.deepcopy({"patches": {"attn1_patch": [Attn1Patch(lay)]}})["patches"]["attn1_patch"][0].layer is lay


# -- NormPatch (object patches of QK-norm modules) --------------------------------------------------------
class QKNorm(torch.nn.Module):
    """Stand-in for ComfyUI's ``comfy.ldm.flux.layers.QKNorm`` (RMS-normalise q and k per head)."""

    def __init__(self) -> None:
        super().__init__()
        self.query_norm = torch.nn.RMSNorm(D)
        self.key_norm = torch.nn.RMSNorm(D)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


def test_norm_patches_of_double_streams_and_single_block_equal_the_joint_transform():
    a = make_adapter(blocks=(("double", 2), ("single", 0)))
    lay = layer(a, mode="object")
    txt_norm, img_norm, single_norm = QKNorm(), QKNorm(), QKNorm()
    q, k = risky(a, "double", 2, T + N, risky_tokens=(1, 2))
    patches = {"txt": NormPatch("double", 2, SITES["double", "txt"], txt_norm, (lay,), probe=PROBE),
               "img": NormPatch("double", 2, SITES["double", "img"], img_norm, (lay,)),
               "joint": NormPatch("single", 0, SITES["single", "joint"], single_norm, (lay,))}
    res = {}

    def body(opts):
        tq, tk = patches["txt"](q[:, :, :T], k[:, :, :T], q[:, :, :T])  # (B, H, T, D)
        iq, ik = patches["img"](q[:, :, T:], k[:, :, T:], q[:, :, T:])  # (B, H, N, D)
        res["double"] = (torch.cat([tq, iq], 2), torch.cat([tk, ik], 2))
        res["single"] = patches["joint"](q, k, q)

    call_model([DiffusionModelWrapper(lay)], body, context_len=T + 5)  # the probe's T wins over the context
    nq = torch.cat([txt_norm.query_norm(q[:, :, :T]), img_norm.query_norm(q[:, :, T:])], 2)
    nk = torch.cat([txt_norm.key_norm(k[:, :, :T]), img_norm.key_norm(k[:, :, T:])], 2)
    ref = a.apply_qk("double", 2, nq, nk, txt_len=T)
    torch.testing.assert_close(res["double"][0], ref[0], rtol=0, atol=1e-6)
    assert not torch.equal(ref[0], nq)
    sref = a.apply_qk("single", 0, single_norm.query_norm(q), single_norm.key_norm(k), txt_len=T)
    assert torch.equal(res["single"][0], sref[0])


def test_norm_patch_runs_an_inner_object_patch_first_and_chains_layers_in_order():
    a, b = make_adapter(blocks=(("single", 0),)), make_adapter(blocks=(("single", 0),), seed=3, threshold=0.05)
    la, lb = layer(a, mode="object"), layer(b, mode="object")
    norm, calls = QKNorm(), []

    def inner(q, k, v):
        calls.append(q.shape)
        return type(norm).forward(norm, q, k, v)

    p = NormPatch("single", 0, SITES["single", "joint"], norm, (la,), inner=inner).with_layer(lb)
    probe = NormPatch("double", 2, SITES["double", "txt"], QKNorm(), (la, lb), probe=PROBE)
    q, k = risky(a, "single", 0, T + N)
    res = {}

    def body(opts):
        probe(q[:, :, :T], k[:, :, :T], q[:, :, :T])
        res["out"] = p(q, k, q)

    call_model([DiffusionModelWrapper(la), DiffusionModelWrapper(lb)], body)
    nq, nk = norm(q, k, q)
    qa, ka = a.apply_qk("single", 0, nq, nk, txt_len=T)
    qab, _ = b.apply_qk("single", 0, qa, ka, txt_len=T)
    assert calls == [q.shape] and torch.equal(res["out"][0], qab)


def test_object_mode_requires_both_streams_of_a_double_block():
    lay = layer(make_adapter(blocks=(("double", 1),)), mode="object")
    p = NormPatch("double", 1, SITES["double", "txt"], QKNorm(), (lay,))
    q = torch.randn(1, H, T, D)
    with pytest.raises(HookNotRunError, match=r"double\.1:img_attn\.norm"):
        call_model([DiffusionModelWrapper(lay)], lambda opts: p(q, q, q))


def test_object_patch_under_torch_compile_runs_on_every_call_and_per_clone():
    """A compiled module whose QK-norm is object-patched after a plain run: torch.compile's guards see the
    instance attribute (no stale graph without the hook), and the hook's bookkeeping runs on every call."""
    a = make_adapter(blocks=(("single", 0),))

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = QKNorm()

        def forward(self, q, k):
            q, k = self.norm(q, k, q)
            return q * 2.0 + k

    block = Block()
    compiled = torch.compile(block, backend="eager")
    q, k = risky(a, "single", 0, T + N)
    plain = compiled(q, k)  # traced without the hook first
    outs = {}
    for strength in (1.0, 0.5):
        lay = layer(a, mode="object", strength=strength)
        block.norm.forward = NormPatch("single", 0, SITES["single", "joint"], block.norm, (lay,))  # as patch_model
        for _ in range(2):
            outs[strength] = call_model([DiffusionModelWrapper(lay)],
                                        lambda opts: (probe(lay), compiled(q, k))[1])  # noqa: B023 (called here)
        del block.norm.forward  # unpatch_model
    nq, nk = block.norm(q, k, q)
    ref = a.apply_qk("single", 0, nq, nk, txt_len=T)
    torch.testing.assert_close(outs[1.0], ref[0] * 2.0 + ref[1], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(outs[1.0], plain) and not torch.allclose(outs[0.5], outs[1.0])
    assert torch.equal(compiled(q, k), plain)  # and the plain module is plain again


# -- risk collection ------------------------------------------------------------------------------------
def test_risk_sink_sees_one_call_and_marks_nothing_gated_when_inactive():
    a = make_adapter()
    lay = layer(a, start_percent=0.5, end_percent=1.0, sigma_start=0.4, sigma_end=0.0)
    q, k = risky(a, "double", 1, T + N)

    def body(opts):
        for kind, idx in (("double", 1), ("single", 0)):
            Attn1Patch(lay)(q, k, q, extra_options=dict(opts, block_type=kind, block_index=idx, img_slice=[T, T + N]))

    for sigma, gated in ((0.3, True), (0.9, False)):
        sink = RiskCollector()
        with collect_risk(sink):
            call_model([DiffusionModelWrapper(lay)], body, sigma=sigma)
            call_model([DiffusionModelWrapper(lay)], body, sigma=sigma)  # a second call is ignored
        rep = sink.report([lay])
        assert sink.closed and [c.label for c in rep.columns] == ["d1", "s0"]
        assert rep.txt_len == T and rep.img_len == N
        col = rep.columns[0]
        assert float(col.txt_rho[1]) > 0.9 > float(col.txt_rho[3])
        assert bool(col.txt_gated[1]) is gated and not bool(col.txt_gated[3])
