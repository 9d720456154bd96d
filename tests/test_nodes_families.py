"""Object patches on the layouts and token orders other ComfyUI versions and families use (no ComfyUI needed).

Found running every family in real ComfyUI (tests/comfy/test_comfy_families.py): ComfyUI 0.3.64's
Qwen-Image attention normalises ``(B, L, H, D)`` (0.20: ``(B, H, L, D)``), and its HunyuanImage 2.1
single blocks see ``[image, text]`` (``flipped_img_txt`` on the double blocks). Here the same
hook objects run on tensors shaped that way and must equal the engine on the true layout.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "comfy"))
from packload import load_pack  # noqa: E402

PACK = load_pack()
from saferope_pack.nodes.compat import ComfyModel, _order  # noqa: E402
from saferope_pack.nodes.layer import SafeRoPELayer  # noqa: E402
from saferope_pack.nodes.patch import DiffusionModelWrapper, NormPatch, collect_risk  # noqa: E402
from saferope_pack.nodes.risk import RiskCollector  # noqa: E402
from saferope_pack.saferope_engine import AdapterMeta, BlockAdapter, ModelShapes, SafeRoPEAdapter, arch  # noqa: E402
from saferope_pack.saferope_engine.errors import HookNotRunError  # noqa: E402

H, D, R, T, N = 4, 32, 2, 6, 9  # heads, head dim, rank, text tokens, image tokens


def adapter(family: str, blocks: dict[str, int], patched: list[tuple[str, int]], seed: int = 0,
            threshold: float = 0.3) -> SafeRoPEAdapter:
    g = torch.Generator().manual_seed(seed)
    out = []
    for kind, idx in patched:
        U = [torch.linalg.qr(torch.randn(H, D, R, generator=g, dtype=torch.float64))[0].float() for _ in range(2)]
        A = [torch.randn(H, R, R, generator=g) for _ in range(2)]
        out.append(BlockAdapter(kind, idx, torch.arange(H), U[0], U[1], 2 * (A[0] - A[0].mT), 2 * (A[1] - A[1].mT)))
    meta = AdapterMeta(num_heads=H, head_dim=D, blocks=blocks, rank=R, threshold=threshold, arch=family)
    return SafeRoPEAdapter(meta, out, source="/adapters/test.safetensors")


def risky_x(a: SafeRoPEAdapter, kind: str, idx: int, which: str, L: int, tokens, seed: int = 1) -> torch.Tensor:
    """(1, H, L, D) vectors whose ``tokens`` lie in the unsafe subspace of every head."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, H, L, D, generator=g)
    U = a.block(kind, idx).U_q if which == "q" else a.block(kind, idx).U_k
    for h in range(H):
        for t in tokens:
            x[0, h, t] = U[h] @ torch.randn(R, generator=g) * 3 + 0.05 * x[0, h, t]
    return x


def run_call(lay: SafeRoPELayer, body, context_len: int = T):
    """Run ``body()`` inside the layer's DIFFUSION_MODEL wrapper, as ComfyUI runs the diffusion model."""
    opts = {"sigmas": torch.tensor([0.5])}
    out = {}

    def executor(*args, **kwargs):
        out["value"] = body()
        return out["value"]

    DiffusionModelWrapper(lay)(executor, torch.zeros(1, 16, 4, 4), torch.tensor([0.5]),
                               torch.zeros(1, context_len, 8), transformer_options=opts)
    return out["value"]


class Norm(torch.nn.Module):
    """An RMSNorm-like QK-norm module of one tensor (what Qwen-Image's attention calls)."""

    def forward(self, x):
        return x


# -- the head axis, read off the tensor ------------------------------------------------------------
QWEN = arch.get("qwen_image")
QWEN_MODEL = ComfyModel(QWEN, ModelShapes("qwen_image", H, D, {"double": 1}), attn1_patch=False)
QWEN_SITES = {n.path: n for n in QWEN.comfy.kinds[0].norms}


def test_registry_site_layout_is_the_020_one():
    assert {n.layout for n in QWEN_SITES.values()} == {"BHLD"}  # 0.3.64 gives (B, L, H, D): the case below


def test_norm_patch_on_blhd_tensors_equals_the_engine():
    """ComfyUI 0.3.64's Qwen-Image: the norms see (B, L, H, D); the patch must find the heads and transform them."""
    a = adapter("qwen_image", {"double": 1}, [("double", 0)])
    lay = SafeRoPELayer(a, QWEN_MODEL, mode="object")
    site = QWEN_SITES["attn.norm_added_q"]
    x = risky_x(a, "double", 0, "q", T, tokens=(1, 2))  # (1, H, T, D)
    patch = NormPatch("double", 0, site, Norm(), (lay,))
    others = [NormPatch("double", 0, QWEN_SITES[p], Norm(), (lay,))
              for p in ("attn.norm_added_k", "attn.norm_q", "attn.norm_k")]

    def body():
        out = patch(x.transpose(1, 2).contiguous())  # as 0.3.64 calls it: (1, T, H, D)
        for p in others:
            p(torch.randn(1, T if "added" in p.site.path else N, H, D))
        return out

    got = run_call(lay, body)
    want = a.apply("double", 0, "q", x, txt_len=T, strength=1.0)
    assert got.shape == (1, T, H, D)
    assert torch.equal(got.transpose(1, 2), want) and not torch.equal(want, x)  # rotated, and like the engine


def test_as_many_tokens_as_heads_takes_the_layout_seen_earlier_in_the_call_or_fails_closed():
    a = adapter("qwen_image", {"double": 1}, [("double", 0)])
    lay = SafeRoPELayer(a, QWEN_MODEL, mode="object")
    img_q = NormPatch("double", 0, QWEN_SITES["attn.norm_q"], Norm(), (lay,))
    txt_q = NormPatch("double", 0, QWEN_SITES["attn.norm_added_q"], Norm(), (lay,))
    rest = [NormPatch("double", 0, QWEN_SITES[p], Norm(), (lay,)) for p in ("attn.norm_k", "attn.norm_added_k")]
    x = risky_x(a, "double", 0, "q", H, tokens=(1,))  # H text tokens: (1, H, H, D) is ambiguous

    def body(first_img: bool):
        def run():
            if first_img:
                img_q(torch.randn(1, N, H, D))  # the image stream comes first in the attention, unambiguous
            out = txt_q(x.transpose(1, 2).contiguous())
            for p in rest:
                p(torch.randn(1, N, H, D))
            return out
        return run

    got = run_call(lay, body(True), context_len=H)
    assert torch.equal(got.transpose(1, 2), a.apply("double", 0, "q", x, txt_len=H, strength=1.0))
    with pytest.raises(HookNotRunError, match="as many tokens as heads"):
        run_call(lay, body(False), context_len=H)


def test_a_tensor_without_the_models_head_count_fails_closed():
    a = adapter("qwen_image", {"double": 1}, [("double", 0)])
    lay = SafeRoPELayer(a, QWEN_MODEL, mode="object")
    patch = NormPatch("double", 0, QWEN_SITES["attn.norm_q"], Norm(), (lay,))
    with pytest.raises(HookNotRunError, match=f"without an axis of the model's {H} heads"):
        run_call(lay, lambda: patch(torch.randn(1, N, H + 1, D)))


# -- the token order of joint sites, read off the model ----------------------------------------------
HUNYUAN = arch.get("hunyuan_image")
SINGLE = next(hk for hk in HUNYUAN.comfy.kinds if hk.kind == "single")


def flux_dm(flipped: bool | None):
    """A stand-in diffusion model: double blocks with (or, as from ComfyUI 0.14, without) ``flipped_img_txt``."""
    block = SimpleNamespace() if flipped is None else SimpleNamespace(flipped_img_txt=flipped)
    return SimpleNamespace(double_blocks=[block])


@pytest.mark.parametrize("flipped,order", [(True, "img_first"), (False, "txt_first"), (None, "txt_first")])
def test_hunyuan_single_block_order_follows_the_models_flag(flipped, order):
    assert SINGLE.flip == "double_blocks.0.flipped_img_txt"
    assert _order(SINGLE, flux_dm(flipped)) == order
    assert _order(arch.get("flux1").comfy.kinds[1], flux_dm(True)) == "txt_first"  # only HunyuanImage reads the flag


def test_image_first_joint_sequences_split_with_the_text_at_the_end():
    """0.3.64's HunyuanImage single blocks: [image, text]; the probe gives the text length, the order its place."""
    blocks = {"double": 1, "single": 1}
    a = adapter("hunyuan_image", blocks, [("single", 0)])
    model = ComfyModel(HUNYUAN, ModelShapes("hunyuan_image", H, D, blocks), attn1_patch=False,
                       orders={"double": "txt_first", "single": "img_first"})
    lay = SafeRoPELayer(a, model, mode="object")
    sites = {(hk.kind, n.path): n for hk in HUNYUAN.comfy.kinds for n in hk.norms}
    class QK(torch.nn.Module):
        def forward(self, q, k, v):
            return q, k

    probe = NormPatch("double", 0, sites[("double", "txt_attn.norm")], QK(), (lay,), probe=("double", "txt_attn.norm"))
    joint = NormPatch("single", 0, sites[("single", "norm")], QK(), (lay,))
    q = risky_x(a, "single", 0, "q", N + T, tokens=(N + 1, N + 2))  # concept tokens inside the trailing text
    k = risky_x(a, "single", 0, "k", N + T, tokens=(N + 1, N + 2), seed=2)
    sink = RiskCollector()

    def body():
        probe(torch.randn(1, H, T, D), torch.randn(1, H, T, D), None)
        return joint(q, k, None)

    with collect_risk(sink):
        q2, k2 = run_call(lay, body)
    want_q, want_k = a.apply_qk("single", 0, q, k, txt_len=T, img_first=True, strength=1.0)
    assert torch.equal(q2, want_q) and torch.equal(k2, want_k) and not torch.equal(q2, q)
    col = sink.report([lay]).columns[0]
    assert col.txt_gated.nonzero().flatten().tolist() == [1, 2]  # text token positions, counted from the text's start
    assert col.img_share.shape == (N,)


def test_attn1_is_not_used_where_a_kind_runs_image_first(monkeypatch):
    """attn1_patch's ``img_slice`` means text first: a model whose single blocks run image first gets object patches."""
    from saferope_pack.nodes import compat

    blocks = {"double": 1, "single": 1}
    dm = SimpleNamespace(single_blocks=[SimpleNamespace()])
    model = SimpleNamespace(model=SimpleNamespace(diffusion_model=dm), get_model_object=lambda name: dm)
    consulted = []
    monkeypatch.setattr(compat.archs, "detect_comfy", lambda base: HUNYUAN)
    monkeypatch.setattr(compat.archs, "comfy_shapes", lambda fam, d: ModelShapes("hunyuan_image", H, D, blocks))
    monkeypatch.setattr(compat, "calls_attn1_patch", lambda cls: consulted.append(cls) or True)
    for flipped, attn1 in ((True, False), (False, True), (None, True)):
        dm.double_blocks = [SimpleNamespace() if flipped is None else SimpleNamespace(flipped_img_txt=flipped)]
        info = compat.comfy_model(model)
        assert info.attn1_patch is attn1 and info.img_first("single") is (flipped is True)
        assert info.img_first("double") is False
    assert consulted  # the blocks' code was read
