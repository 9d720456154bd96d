"""The SafeRoPE transform (design §2): parity with the per-token matrix_exp formula, properties."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from saferope_engine import BlockAdapter, core, saferope_qk
from saferope_engine.rotation import expm_apply_series, normal_form, reference_rotate
from saferope_engine.testing import random_orthonormal, random_skew


def make_block(kind: str, heads: list[int], D: int, r: int, *, segments=("txt", "img"), seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    n = len(heads)
    return BlockAdapter(kind, 0, torch.tensor(heads), random_orthonormal(n, D, r, generator=g),
                        random_orthonormal(n, D, r, generator=g),
                        random_skew(n, r, scale=scale, generator=g) if "txt" in segments else None,
                        random_skew(n, r, scale=scale, generator=g) if "img" in segments else None)


def risky_inputs(block: BlockAdapter, B: int, H: int, L: int, *, seed=1, frac=0.5):
    """Random (B,H,L,D) q,k where about `frac` of the tokens of selected heads lie mostly in span(U)."""
    g = torch.Generator().manual_seed(seed)
    D, r = block.head_dim, block.rank
    q = torch.randn(B, H, L, D, generator=g)
    k = torch.randn(B, H, L, D, generator=g)
    for x, U in ((q, block.U_q), (k, block.U_k)):
        for i, h in enumerate(block.heads.tolist()):
            pick = torch.rand(B, L, generator=g) < frac
            inside = torch.randn(B, L, r, generator=g) @ U[i].T  # (B,L,D) in span(U)
            mix = torch.rand(B, L, 1, generator=g)  # varying risk levels
            x[:, h] = torch.where(pick.unsqueeze(-1), inside * 1.5 + mix * x[:, h], x[:, h])
    return q, k


def reference(x: torch.Tensor, block: BlockAdapter, which: str, txt_len: int, strength: float, tau: float):
    """Design §2 written straight from the formula, per token with torch.matrix_exp, in float64."""
    U = (block.U_q if which == "q" else block.U_k).double()
    out = x.double().clone()
    L = x.shape[2]
    for i, h in enumerate(block.heads.tolist()):
        for t in range(L):
            A = block.A_txt if t < txt_len else block.A_img
            if A is None:
                continue
            v = x[:, h, t].double()  # (B, D)
            c = v @ U[i]  # (B, r)
            rho = (c.square().sum(-1) / v.square().sum(-1).clamp_min(1e-12)).clamp(0, 1)
            gate = torch.where(rho > tau, rho, torch.zeros_like(rho))
            E = torch.matrix_exp(strength * gate[:, None, None] * A[i].double())  # (B, r, r)
            out[:, h, t] = v + ((E @ c.unsqueeze(-1)).squeeze(-1) - c) @ U[i].T
    return out


@pytest.fixture(params=["auto", "dense", "sparse", "device"])
def cpu_path(request, monkeypatch):
    """Run a test through each inference path: the CPU's default choice, always dense, always gathered,
    and the device path (what CUDA runs: no host read of the gate, no early exit)."""
    share = {"auto": core.SPARSE_MAX_SHARE, "dense": 0.0, "sparse": 1.0, "device": core.SPARSE_MAX_SHARE}[request.param]
    monkeypatch.setattr(core, "SPARSE_MAX_SHARE", share)
    monkeypatch.setattr(core, "HOST_SHORTCUTS", request.param != "device")
    return request.param


def generator_scale(rank: int) -> float:
    """Entry scale giving rotation angles up to about π (the useful range; beyond it angles alias)."""
    return 1.0 / max(1.0, rank ** 0.5)


@pytest.mark.parametrize("rank", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("kind", ["double", "single"])
def test_parity_with_per_token_matrix_exp(rank, kind, cpu_path):
    """fp32 engine vs float64 per-token matrix_exp: max abs error ≤ 1e-5."""
    H, D, B, L, txt = 4, 16, 2, 12, 5
    block = make_block(kind, [0, 2, 3], D, rank, seed=rank, scale=generator_scale(rank))
    q, k = risky_inputs(block, B, H, L, seed=rank + 10)
    angles = normal_form(torch.cat([block.A_txt, block.A_img]))[1]
    assert rank < 2 or angles.max() > 0.5  # the rotations are not trivially small
    for tau in (0.0, 0.3, 0.6, 0.9):
        for strength in (1.0, 0.5):
            q2, k2 = saferope_qk(q, k, block, txt_len=txt, strength=strength, threshold=tau)
            err_q = (q2.double() - reference(q, block, "q", txt, strength, tau)).abs().max().item()
            err_k = (k2.double() - reference(k, block, "k", txt, strength, tau)).abs().max().item()
            assert err_q <= 1e-5 and err_k <= 1e-5, (tau, strength, err_q, err_k)


@pytest.mark.parametrize("rank", [2, 5, 8])
def test_float64_parity_is_exact_even_for_large_angles(rank):
    """In float64 the closed form equals the matrix_exp formula to ~1e-12, whatever the angle."""
    block = make_block("single", [0, 1], 16, rank, seed=rank, scale=2.0)
    q, k = risky_inputs(block, 2, 3, 9, seed=rank)
    q, k = q.double(), k.double()
    q2, k2 = saferope_qk(q, k, block, txt_len=4, strength=2.0, threshold=0.1)
    assert q2.dtype == torch.float64
    assert (q2 - reference(q, block, "q", 4, 2.0, 0.1)).abs().max() < 1e-10
    assert (k2 - reference(k, block, "k", 4, 2.0, 0.1)).abs().max() < 1e-10


@pytest.mark.parametrize("segments", [("txt",), ("img",), ("txt", "img")])
def test_parity_per_segment_and_untouched_segment(segments, cpu_path):
    H, D, B, L, txt = 3, 8, 1, 10, 4
    block = make_block("single", [1], D, 4, segments=segments, seed=3)
    q, k = risky_inputs(block, B, H, L, frac=0.8)
    q2, k2 = saferope_qk(q, k, block, txt_len=txt, threshold=0.2)
    assert (q2.double() - reference(q, block, "q", txt, 1.0, 0.2)).abs().max() <= 1e-5
    assert (k2.double() - reference(k, block, "k", txt, 1.0, 0.2)).abs().max() <= 1e-5
    if "txt" not in segments:
        assert torch.equal(q2[:, :, :txt], q[:, :, :txt]) and torch.equal(k2[:, :, :txt], k[:, :, :txt])
    if "img" not in segments:
        assert torch.equal(q2[:, :, txt:], q[:, :, txt:]) and torch.equal(k2[:, :, txt:], k[:, :, txt:])
    assert not torch.equal(q2, q)  # something in the active segment was gated and rotated


def test_normal_form_reconstructs_generator():
    for r in range(1, 9):
        A = random_skew(5, r, generator=torch.Generator().manual_seed(r)).double()
        P, theta = normal_form(A)
        J = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
        blocks = torch.zeros(5, 2 * (r // 2), 2 * (r // 2), dtype=torch.float64)
        for j in range(r // 2):
            blocks[:, 2 * j:2 * j + 2, 2 * j:2 * j + 2] = theta[:, j, None, None] * J
        rebuilt = P @ blocks @ P.transpose(-1, -2)
        assert (rebuilt - A).abs().max() < 1e-10
        assert (theta >= 0).all()


def test_degenerate_spectra_still_reproduce_the_formula():
    """A = 0 and repeated angles (θJ ⊕ θJ) have degenerate eigenspaces; the closed form must not care."""
    J = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    A = Q @ torch.block_diag(0.7 * J, 0.7 * J) @ Q.T
    A = torch.stack([torch.zeros(4, 4, dtype=torch.float64), 0.5 * (A - A.T)])  # (2,4,4), exactly skew
    g = torch.Generator().manual_seed(1)
    block = BlockAdapter("double", 0, torch.tensor([0, 1]), random_orthonormal(2, 8, 4, generator=g),
                         random_orthonormal(2, 8, 4, generator=g), A.float(), None)
    q, k = risky_inputs(block, 1, 2, 6, frac=1.0)
    q, k = q.double(), k.double()
    block = BlockAdapter("double", 0, block.heads, block.U_q.double(), block.U_k.double(), A, None)
    q2, k2 = saferope_qk(q, k, block, txt_len=6, threshold=0.0)
    assert (q2 - reference(q, block, "q", 6, 1.0, 0.0)).abs().max() < 1e-10
    assert (k2 - reference(k, block, "k", 6, 1.0, 0.0)).abs().max() < 1e-10
    assert torch.equal(q2[:, 0], q[:, 0])  # A = 0: the identity
    assert not torch.equal(q2[:, 1], q[:, 1])


def test_series_matches_matrix_exp_for_large_angles():
    A = random_skew(3, 5, scale=4.0, generator=torch.Generator().manual_seed(1)).double()
    c = torch.randn(2, 3, 7, 5, dtype=torch.float64)
    s = torch.rand(2, 3, 7, dtype=torch.float64) * 2
    want = (torch.matrix_exp(s[..., None, None] * A[None, :, None]) @ c.unsqueeze(-1)).squeeze(-1)
    assert (expm_apply_series(c, A, s) - want).abs().max() < 1e-9


def test_norm_preserved(cpu_path):
    block = make_block("double", [0, 1, 2, 3], 32, 5, scale=2.0)
    q, k = risky_inputs(block, 2, 4, 20, frac=0.9)
    q2, k2, risk = saferope_qk(q, k, block, txt_len=8, threshold=0.1, return_risk=True)
    assert risk.gated_q.any() and risk.gated_k.any()
    for a, b in ((q, q2), (k, k2)):
        assert torch.allclose(a.norm(dim=-1), b.norm(dim=-1), rtol=1e-5, atol=1e-5)
        assert not torch.equal(a, b)


def test_bit_identity_for_strength_zero_ungated_tokens_and_unselected_heads(cpu_path):
    H, L, txt = 5, 16, 6
    block = make_block("single", [1, 3], 16, 3, scale=2.0)
    q, k = risky_inputs(block, 2, H, L, frac=0.5)
    q0, k0 = saferope_qk(q, k, block, txt_len=txt, strength=0.0, threshold=0.3)
    assert torch.equal(q0, q) and torch.equal(k0, k)
    q2, k2, risk = saferope_qk(q, k, block, txt_len=txt, threshold=0.3, return_risk=True)
    for x, y, gated in ((q, q2, risk.gated_q), (k, k2, risk.gated_k)):
        assert gated.any() and not gated.all()
        unselected = [h for h in range(H) if h not in (1, 3)]
        assert torch.equal(y[:, unselected], x[:, unselected])
        sel_x, sel_y = x[:, [1, 3]], y[:, [1, 3]]  # (B, n, L, D)
        assert torch.equal(sel_y[~gated], sel_x[~gated])  # ungated tokens: bit-identical
        assert not torch.equal(sel_y[gated], sel_x[gated])


def test_threshold_one_below_gates_nothing_and_returns_inputs():
    block = make_block("double", [0], 8, 2)
    q, k = risky_inputs(block, 1, 2, 6)
    q2, k2 = saferope_qk(q, k, block, txt_len=3, threshold=0.999999)
    assert q2 is q and k2 is k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_keep_dtype_and_untouched_tokens(dtype, cpu_path):
    block = make_block("single", [0, 1], 16, 3)
    q, k = risky_inputs(block, 1, 2, 12, frac=0.5)
    q, k = q.to(dtype), k.to(dtype)
    q2, k2, risk = saferope_qk(q, k, block, txt_len=5, threshold=0.3, return_risk=True)
    assert q2.dtype == dtype and k2.dtype == dtype
    assert torch.equal(q2[~risk.gated_q], q[~risk.gated_q])
    want = reference(q.float(), block, "q", 5, 1.0, 0.3)
    assert (q2.double() - want).abs().max() < (2e-2 if dtype == torch.bfloat16 else 5e-3)


def test_gradients_reach_generators_and_match_reference():
    block = make_block("single", [0, 2], 16, 4)
    q, k = risky_inputs(block, 2, 3, 10, frac=0.7)
    A_txt = block.A_txt.clone().double().requires_grad_()
    A_img = block.A_img.clone().double().requires_grad_()
    train_block = BlockAdapter("single", 0, block.heads, block.U_q.double(), block.U_k.double(), A_txt, A_img)
    qd, kd = q.double(), k.double()
    q2, k2 = saferope_qk(qd, kd, train_block, txt_len=4, threshold=0.2)
    w = torch.randn_like(q2)
    loss = (q2 * w).sum() + k2.square().sum()
    loss.backward()
    assert A_txt.grad.abs().sum() > 0 and A_img.grad.abs().sum() > 0
    # Same loss through the per-token matrix_exp reference (autograd through matrix_exp).
    ref_txt, ref_img = A_txt.detach().clone().requires_grad_(), A_img.detach().clone().requires_grad_()
    ref_block = BlockAdapter("single", 0, block.heads, block.U_q, block.U_k, ref_txt, ref_img)
    rq = _reference_autograd(qd, ref_block, "q", 4, 0.2)
    rk = _reference_autograd(kd, ref_block, "k", 4, 0.2)
    ((rq * w).sum() + rk.square().sum()).backward()
    assert torch.allclose(A_txt.grad, ref_txt.grad, atol=1e-7) and torch.allclose(A_img.grad, ref_img.grad, atol=1e-7)


def _reference_autograd(x, block, which, txt_len, tau):
    U = (block.U_q if which == "q" else block.U_k).double()
    xs = x[:, block.heads]  # (B, n, L, D)
    c = xs @ U
    rho = (c.square().sum(-1) / xs.square().sum(-1)).clamp(0, 1)
    s = rho * (rho > tau)
    parts = [reference_rotate(xs[:, :, :txt_len], U, block.A_txt, s[:, :, :txt_len]),
             reference_rotate(xs[:, :, txt_len:], U, block.A_img, s[:, :, txt_len:])]
    out = x.clone()
    out[:, block.heads] = torch.cat(parts, dim=2)
    return out


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_no_per_token_rank_by_rank_tensor_is_materialised():
    B, H, L, D, r = 2, 3, 40, 16, 5
    block = make_block("single", [0, 1, 2], D, r)
    q, k = risky_inputs(block, B, H, L, frac=0.9)
    rec = _ShapeRecorder()
    with rec:
        saferope_qk(q, k, block, txt_len=10, threshold=0.1)
    limit = B * H * L * r * r
    big_rr = [s for s in rec.shapes if len(s) >= 2 and s[-2:] == (r, r) and torch.Size(s).numel() >= limit // 4]
    assert rec.shapes and not big_rr, big_rr


def test_input_validation_messages():
    block = make_block("double", [0, 3], 8, 2)
    q = torch.randn(1, 4, 6, 8)
    with pytest.raises(ValueError, match="txt_len"):
        saferope_qk(q, q, block, txt_len=7, threshold=0.5)
    with pytest.raises(ValueError, match="head dim"):
        saferope_qk(torch.randn(1, 4, 6, 9), torch.randn(1, 4, 6, 9), block, txt_len=2, threshold=0.5)
    with pytest.raises(ValueError, match="selects q head 3"):
        saferope_qk(torch.randn(1, 3, 6, 8), torch.randn(1, 3, 6, 8), block, txt_len=2, threshold=0.5)
    with pytest.raises(ValueError, match="threshold"):
        saferope_qk(q, q, block, txt_len=2, threshold=1.0)
    with pytest.raises(ValueError, match="strength"):
        saferope_qk(q, q, block, txt_len=2, threshold=0.5, strength=-1.0)


def test_runtime_cache_follows_generator_updates():
    """Changing a generator (in place or by reassignment) must never reuse stale precomputation."""
    block = make_block("double", [0, 1], 16, 4)
    q, k = risky_inputs(block, 1, 2, 8, frac=1.0)
    first, _ = saferope_qk(q, k, block, txt_len=8, threshold=0.1)
    block.A_txt.mul_(2.0)  # in place
    second, _ = saferope_qk(q, k, block, txt_len=8, threshold=0.1)
    assert (second.double() - reference(q, block, "q", 8, 1.0, 0.1)).abs().max() < 1e-5
    assert not torch.equal(first, second)
    block.A_txt = block.A_txt * 0.25  # reassigned
    third, _ = saferope_qk(q, k, block, txt_len=8, threshold=0.1)
    assert (third.double() - reference(q, block, "q", 8, 1.0, 0.1)).abs().max() < 1e-5


def test_text_only_adapter_reports_risk_for_every_token_and_leaves_the_image_alone(cpu_path):
    """Text-only adapters compute on the text span; the risk map still covers image tokens."""
    block = make_block("double", [0, 1], 16, 3, segments=("txt",), seed=7)
    q, k = risky_inputs(block, 2, 2, 12, frac=0.7)
    txt = 5
    q1, k1 = saferope_qk(q, k, block, txt_len=txt, threshold=0.2)
    q2, k2, risk = saferope_qk(q, k, block, txt_len=txt, threshold=0.2, return_risk=True)
    assert torch.equal(q1, q2) and torch.equal(k1, k2)
    assert torch.equal(q1[:, :, txt:], q[:, :, txt:]) and not torch.equal(q1[:, :, :txt], q[:, :, :txt])
    assert risk.rho_q.shape == (2, 2, 12)
    c = torch.einsum("bhld,hdr->bhlr", q.double(), block.U_q.double())  # (B,n,L,r)
    direct = (c.square().sum(-1) / q.double().square().sum(-1)).clamp(0, 1)
    assert torch.allclose(risk.rho_q.double(), direct, atol=1e-5)
    assert risk.gated_q[..., :txt].any() and not risk.gated_q[..., txt:].any()
    assert (direct[..., txt:] > 0.2).any()  # image tokens would have been gated by an image generator


@pytest.mark.parametrize("heads", [[0, 1, 2], [1]])
def test_inplace_equals_out_of_place_and_is_refused_under_autograd(heads, cpu_path):
    block = make_block("single", heads, 16, 4, seed=11)
    q, k = risky_inputs(block, 2, 3, 10, frac=0.6)
    ref_q, ref_k = saferope_qk(q, k, block, txt_len=4, threshold=0.3)
    q1, k1 = q.clone(), k.clone()
    q2, k2 = saferope_qk(q1, k1, block, txt_len=4, threshold=0.3, inplace=True)
    assert torch.equal(q2, ref_q) and torch.equal(k2, ref_k)
    if cpu_path == "sparse":  # the gathered path writes into the caller's tensors (the dense one may not)
        assert q2 is q1 and k2 is k1
        assert torch.equal(q1, ref_q) and torch.equal(k1, ref_k)
    q3, k3 = q.clone().requires_grad_(), k.clone().requires_grad_()
    q4, _ = saferope_qk(q3, k3, block, txt_len=4, threshold=0.3, inplace=True)
    assert torch.equal(q3.detach(), q) and torch.allclose(q4.detach(), ref_q, atol=1e-6)  # autograd: out of place
    q4.sum().backward()
    assert q3.grad is not None


def test_image_first_layout_equals_the_text_first_one_on_reordered_tokens(cpu_path):
    """``img_first``: the same tokens in the order [image, text] (diffusers' HunyuanImage, Z-Image)."""
    block = make_block("single", [0, 2], 16, 4, seed=3)
    q, k = risky_inputs(block, 2, 3, 11, seed=4)
    txt = 4
    q2, k2 = saferope_qk(q, k, block, txt_len=txt, threshold=0.3)
    perm = torch.cat([torch.arange(txt, 11), torch.arange(txt)])  # image tokens first
    qi, ki = saferope_qk(q[:, :, perm], k[:, :, perm], block, txt_len=txt, img_first=True, threshold=0.3)
    assert torch.allclose(qi, q2[:, :, perm], atol=1e-6) and torch.allclose(ki, k2[:, :, perm], atol=1e-6)
    assert not torch.equal(q2, q)


def test_single_tensor_transform_equals_the_joint_one(cpu_path):
    block = make_block("double", [1, 3], 16, 3, seed=5)
    q, k = risky_inputs(block, 2, 4, 9, seed=6)
    q2, k2 = saferope_qk(q, k, block, txt_len=5, threshold=0.2)
    assert torch.equal(core.saferope_x(q, block, "q", txt_len=5, threshold=0.2), q2)
    assert torch.equal(core.saferope_x(k, block, "k", txt_len=5, threshold=0.2), k2)


def test_grouped_query_keys_rotate_with_their_groups_first_generator(cpu_path):
    """4 query heads, 2 key heads: selected query heads [0, 1, 3] -> key heads [0, 1] with generators of rows 0 and 2."""
    D, r, g = 16, 4, torch.Generator().manual_seed(9)
    heads = torch.tensor([0, 1, 3])
    block = BlockAdapter("main", 0, heads, random_orthonormal(3, D, r, generator=g), random_orthonormal(2, D, r, generator=g),
                         random_skew(3, r, scale=0.7, generator=g), None, kv_group=2)
    assert block.k_heads.tolist() == [0, 1] and block.k_rows.tolist() == [0, 2]
    k = torch.randn(2, 2, 7, D, generator=g)  # (B, H_kv, L, D)
    k[:, :, :3] += 3 * (torch.randn(2, 2, 3, r, generator=g) @ block.U_k.transpose(-1, -2))  # risky text tokens
    out = core.saferope_x(k, block, "k", txt_len=7, threshold=0.3)
    ref_block = BlockAdapter("main", 0, torch.tensor([0, 1]), block.U_k, block.U_k, block.A_txt[[0, 2]], None)
    expect = reference(k, ref_block, "k", txt_len=7, strength=1.0, tau=0.3)
    assert torch.allclose(out.double(), expect, atol=1e-5)
    assert not torch.equal(out, k)


def test_a_huge_generator_is_refused_at_once_instead_of_looping():
    """A diverged generator (one entry 1.7e38) would take ~1e38 series steps; the series refuses in milliseconds."""
    import time

    from saferope_engine import SafeRoPEError

    A = torch.zeros(1, 2, 2)
    A[0, 0, 1], A[0, 1, 0] = 1.7e38, -1.7e38
    c, s = torch.randn(1, 1, 3, 2), torch.ones(1, 1, 3)
    t0 = time.perf_counter()
    with pytest.raises(SafeRoPEError, match="too large.*lower the learning rate"):
        expm_apply_series(c, A.requires_grad_(), s)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(SafeRoPEError):
            expm_apply_series(c, torch.full((1, 2, 2), bad), s)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("share", [0.1, 0.5])
def test_ungated_tokens_keep_their_bits_even_negative_zeros(share, cpu_path):
    """Bit-identity of ungated tokens is exact, not "x + 0": a −0.0 or an infinite coordinate of an
    ungated token stays what it was, whichever path runs (a few or half of the tokens gated)."""
    block = make_block("single", [0, 1], 16, 4, seed=8)
    q, k = risky_inputs(block, 2, 2, 24, frac=share, seed=9)
    for x in (q, k):
        x[:, :, ::3, 0] = -0.0
        x[0, 1, 5, 2] = float("inf")
    q2, k2, risk = saferope_qk(q, k, block, txt_len=8, threshold=0.5, return_risk=True)
    for x, x2, gated in ((q, q2, risk.gated_q), (k, k2, risk.gated_k)):
        assert gated.any() and not gated.all()
        keep = ~gated  # (B, n, L) over the selected heads [0, 1], which are all heads here
        b, h, t = keep.nonzero(as_tuple=True)
        before, after = x[b, h, t], x2[b, h, t]
        assert torch.equal(before.view(torch.int32), after.view(torch.int32))
        assert torch.signbit(after[:, 0][before[:, 0] == 0]).all()
