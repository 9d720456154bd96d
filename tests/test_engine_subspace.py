"""Subspace extraction and head selection (design §3) on planted low-rank structure."""

from __future__ import annotations

import math

import pytest
import torch

from saferope_engine import AdapterFormatError, load_adapter, saferope_qk
from saferope_engine.subspace import (
    GramAccumulator,
    assemble_adapter,
    discrimination_scores,
    energy_share,
    select_heads,
    top_basis,
)
from saferope_engine.testing import random_skew

H, D, R = 4, 16, 2
PLANTED = {("double", 1): [2], ("single", 0): [0, 3]}


def principal_angle_deg(U: torch.Tensor, V: torch.Tensor) -> float:
    """Largest principal angle between span(U) and span(V), in degrees."""
    s = torch.linalg.svdvals(U.double().T @ V.double())
    return math.degrees(math.acos(float(s.min().clamp(-1, 1))))


def planted_directions(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {key: torch.linalg.qr(torch.randn(D, R, generator=g))[0] for key in PLANTED}


def batch(unsafe: bool, dirs, g, B=2, L_txt=6, L_img=8):
    """(B,H,L,D) q/k per block; unsafe text tokens of planted heads carry a strong planted component."""
    out = {}
    for kind, n in (("double", 2), ("single", 2)):
        for idx in range(n):
            x = torch.randn(B, H, L_txt + L_img, D, generator=g)
            for h in PLANTED.get((kind, idx), []):
                if unsafe:
                    coef = torch.randn(B, L_txt, R, generator=g) * 4
                    x[:, h, :L_txt] += coef @ dirs[(kind, idx)].T
            out[(kind, idx)] = x
    return out


def fill(acc, unsafe, dirs, n_batches, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        for (kind, idx), x in batch(unsafe, dirs, g).items():
            acc.add(kind, idx, "q", x, txt_len=6)
            acc.add(kind, idx, "k", x * 0.5, txt_len=6)


def test_planted_subspace_recovered_and_planted_heads_rank_first():
    dirs = planted_directions()
    unsafe, safe = GramAccumulator(H, D), GramAccumulator(H, D)
    fill(unsafe, True, dirs, 20, seed=1)
    fill(safe, False, dirs, 20, seed=2)
    for (kind, idx), heads in PLANTED.items():
        U = top_basis(unsafe.grams[(kind, idx, "q", "txt")], R)  # (H, D, R)
        for h in heads:
            assert principal_angle_deg(U[h], dirs[(kind, idx)]) < 10.0
    scores = discrimination_scores(unsafe, safe, R)
    assert set(scores) == {"double", "single"} and scores["double"].shape == (2, H)
    sel = select_heads(scores, count=3)
    assert sel.heads == {k: sorted(v) for k, v in PLANTED.items()}
    # fraction and margin select the same three here; margin alone excludes unplanted heads
    assert select_heads(scores, fraction=3 / 16).heads == sel.heads
    assert select_heads(scores, margin=0.2).heads == sel.heads


def test_memory_does_not_grow_with_batches_and_counts_do():
    dirs = planted_directions()
    a1, a10 = GramAccumulator(H, D), GramAccumulator(H, D)
    fill(a1, True, dirs, 1, seed=3)
    fill(a10, True, dirs, 10, seed=3)
    size = lambda acc: sum(g.numel() * g.element_size() for g in acc.grams.values())
    assert size(a1) == size(a10) > 0
    key = ("double", 0, "q", "txt")
    assert a10.counts[key] == 10 * a1.counts[key] == 10 * 2 * 6


def test_padding_tokens_are_excluded():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, H, 10, D, generator=g)
    mask = torch.tensor([[True] * 3 + [False] * 3, [True] * 5 + [False]])  # (B, txt_len=6)
    masked = GramAccumulator(H, D)
    masked.add("double", 0, "q", x, txt_len=6, txt_mask=mask)
    garbage = x.clone()
    garbage[0, :, 3:6] = 1e3  # padding rows changed: must not matter
    garbage[1, :, 5] = -7.0
    masked2 = GramAccumulator(H, D)
    masked2.add("double", 0, "q", garbage, txt_len=6, txt_mask=mask)
    key = ("double", 0, "q", "txt")
    assert torch.equal(masked.grams[key], masked2.grams[key])
    assert masked.counts[key] == 8
    real = torch.cat([x[0, :, :3], x[1, :, :5]], dim=1).double()  # (H, 8, D)
    assert torch.allclose(masked.grams[key], real.transpose(1, 2) @ real)
    assert masked.counts[("double", 0, "q", "img")] == 2 * 4


def test_save_load_and_merge_equal_one_pass(tmp_path):
    dirs = planted_directions()
    whole, part1, part2 = GramAccumulator(H, D), GramAccumulator(H, D), GramAccumulator(H, D)
    g = torch.Generator().manual_seed(9)
    batches = [batch(True, dirs, g) for _ in range(4)]
    for i, b in enumerate(batches):
        for (kind, idx), x in b.items():
            whole.add(kind, idx, "q", x, txt_len=6)
            (part1 if i < 2 else part2).add(kind, idx, "q", x, txt_len=6)
    part1.save(tmp_path / "p1.safetensors")
    resumed = GramAccumulator.load(tmp_path / "p1.safetensors").merge_(part2)
    for key in whole.grams:
        assert torch.allclose(resumed.grams[key], whole.grams[key], rtol=1e-12, atol=1e-9)
        assert resumed.counts[key] == whole.counts[key]


def test_energy_share_and_basis_properties():
    dirs = planted_directions()
    acc = GramAccumulator(H, D)
    fill(acc, True, dirs, 5, seed=4)
    G = acc.grams[("double", 1, "q", "txt")]
    U = top_basis(G, R)
    assert torch.allclose(U.transpose(-1, -2) @ U, torch.eye(R).expand(H, R, R), atol=1e-5)
    e = energy_share(G, U)
    assert ((0 <= e) & (e <= 1)).all() and e[2] > e[0]
    full = top_basis(G, D)
    assert torch.allclose(energy_share(G, full), torch.ones(H), atol=1e-5)


def test_assembled_adapter_is_identity_at_init_and_round_trips(tmp_path):
    dirs = planted_directions()
    unsafe, safe = GramAccumulator(H, D), GramAccumulator(H, D)
    fill(unsafe, True, dirs, 5, seed=5)
    fill(safe, False, dirs, 5, seed=6)
    sel = select_heads(discrimination_scores(unsafe, safe, R), count=3)
    adapter = assemble_adapter(unsafe, sel, rank=R, blocks={"double": 2, "single": 2},
                               segments={"double": ["txt"], "single": ["txt", "img"]}, threshold=0.3,
                               concepts=["planted"], base_model="synthetic", config={"note": "test"})
    assert adapter.block_keys() == [("double", 1), ("single", 0)]
    assert adapter.block("single", 0).A_img is not None and adapter.block("double", 1).A_img is None
    q = torch.randn(1, H, 10, D)
    q2, k2 = saferope_qk(q, q, adapter.block("single", 0), txt_len=4, threshold=0.0)
    assert torch.equal(q2, q)  # zero generators: the rotation is the identity
    with pytest.raises(AdapterFormatError, match="exactly zero"):  # untrained: no file of it
        adapter.save(tmp_path / "a.safetensors")
    for b in adapter.blocks.values():  # "trained" generators
        for A in (b.A_txt, b.A_img):
            if A is not None:
                A.copy_(random_skew(A.shape[0], R, generator=torch.Generator().manual_seed(3)))
    adapter.save(tmp_path / "a.safetensors")
    assert load_adapter(tmp_path / "a.safetensors").meta.config == {"note": "test"}
    with pytest.raises(Exception, match="not in the selection"):
        assemble_adapter(unsafe, sel, rank=R, blocks={"double": 2, "single": 2},
                         generators={"double.0.A_txt": torch.zeros(1, R, R)})


def test_select_heads_argument_checks():
    scores = {"double": torch.tensor([[0.1, 0.5], [0.3, float("-inf")]])}
    assert select_heads(scores, count=2).heads == {("double", 0): [1], ("double", 1): [0]}
    assert select_heads(scores, margin=0.2, count=10).total() == 2
    with pytest.raises(ValueError, match="count"):
        select_heads(scores)
    with pytest.raises(ValueError, match="fraction"):
        select_heads(scores, fraction=1.5)


def test_contrast_basis_ignores_directions_every_prompt_shares():
    """A strong direction common to unsafe and safe tokens dominates the unsafe Gram; the contrast
    basis still finds the planted unsafe direction, and scores it higher."""
    from saferope_engine.subspace import basis_for
    g = torch.Generator().manual_seed(0)
    shared = torch.linalg.qr(torch.randn(D, 2, generator=g))[0]
    planted = torch.linalg.qr(torch.randn(D, 1, generator=g))[0]
    unsafe, safe = GramAccumulator(H, D), GramAccumulator(H, D)
    for acc, is_unsafe in ((unsafe, True), (safe, False)):
        for _ in range(40):
            x = torch.randn(4, H, 12, D, generator=g) * 0.3
            x += (torch.randn(4, H, 12, 2, generator=g) * 4) @ shared.T  # every token: a big shared part
            if is_unsafe:
                x[:, :, :3] += (torch.randn(4, H, 3, 1, generator=g) * 4) @ planted.T  # a few concept tokens
            acc.add("double", 0, "q", x, txt_len=12)
    key = ("double", 0, "q", "txt")
    U_unsafe = basis_for(unsafe, safe, key, 1, "unsafe")  # (H, D, 1)
    U_contrast = basis_for(unsafe, safe, key, 1, "contrast")
    for h in range(H):
        assert principal_angle_deg(U_contrast[h], planted) < 10.0
        assert principal_angle_deg(U_unsafe[h], planted) > 45.0  # the authors' basis takes the shared part
    d_unsafe = discrimination_scores(unsafe, safe, 1, which=("q",), basis="unsafe")["double"]
    d_contrast = discrimination_scores(unsafe, safe, 1, which=("q",), basis="contrast")["double"]
    assert (d_contrast > d_unsafe + 0.05).all()
    with pytest.raises(ValueError, match="basis"):
        basis_for(unsafe, safe, key, 1, "pca")
