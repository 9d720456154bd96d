"""Importer for the authors' RotaryAdapter checkpoint layout."""

from __future__ import annotations

import pytest
import torch

from saferope_engine import AdapterFormatError, load_adapter, saferope_qk
from saferope_engine.authors import import_authors_state_dict, load_authors_checkpoint
from saferope_engine.testing import random_orthonormal

nD, nS, H, D, r = 2, 3, 4, 16, 3


def authors_state_dict(seed=0, dtype=torch.float16, dead=((0, "double", 1), (2, "single", 0))):
    """A state dict shaped like theirs: non-skew S (their optimiser drifts), fp16, dead heads zeroed."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(nD):
        sd[f"S_param_Double.{i}"] = (torch.randn(H, r, r, generator=g)).to(dtype)
    for i in range(nS):
        sd[f"S_param_Single.{i}"] = (torch.randn(2, H, r, r, generator=g)).to(dtype)
    for which in ("query", "key"):
        for code, n in (("D", nD), ("S", nS)):
            U = random_orthonormal(n * H, D, r, generator=g).reshape(n, H, D, r)
            for block, kind, head in dead:
                if kind == ("double" if code == "D" else "single"):
                    U[block, head] = 0
            sd[f"_U_{which}_cache_{code}"] = U.to(dtype)
    return sd


def test_import_conventions():
    sd = authors_state_dict()
    adapter, report = import_authors_state_dict(sd, threshold=0.7)
    m = adapter.meta
    assert (m.num_heads, m.head_dim, m.blocks["double"], m.blocks["single"], m.rank) == (H, D, nD, nS, r)
    assert m.arch == "flux1"
    assert m.threshold == 0.7
    assert report.dropped_heads == {"double.0": [1], "single.2": [0]}
    assert adapter.block("double", 0).heads.tolist() == [0, 2, 3]
    S = sd["S_param_Double.1"].double()
    want = 0.5 * (S.transpose(-1, -2) - S)  # skew part of Sᵀ
    assert torch.allclose(adapter.block("double", 1).A_txt.double(), want, atol=1e-6)
    assert adapter.block("double", 1).A_img is None  # double blocks: text tokens only
    single = adapter.block("single", 1)
    S1 = sd["S_param_Single.1"].double()
    assert torch.allclose(single.A_img.double(), 0.5 * (S1[0].transpose(-1, -2) - S1[0]), atol=1e-6)
    assert torch.allclose(single.A_txt.double(), 0.5 * (S1[1].transpose(-1, -2) - S1[1]), atol=1e-6)
    assert report.max_symmetric_part > 0.3  # random S is far from skew: reported
    assert 0 < report.max_orthonormality_fix < 1e-2  # fp16 bases were re-orthonormalised
    U = adapter.block("single", 1).U_q
    assert torch.allclose(U.transpose(-1, -2) @ U, torch.eye(r).expand_as(U.transpose(-1, -2) @ U), atol=1e-5)


def test_swapped_single_segments_and_bad_mapping():
    sd = authors_state_dict()
    a, _ = import_authors_state_dict(sd, single_segments=("txt", "img"))
    b, _ = import_authors_state_dict(sd)
    assert torch.equal(a.block("single", 0).A_txt, b.block("single", 0).A_img)
    with pytest.raises(ValueError, match="permutation"):
        import_authors_state_dict(sd, single_segments=("txt", "txt"))


def test_imported_math_equals_authors_row_vector_formula():
    """For skew S their  c_row · exp(g·S)  equals our  exp(g·A) c  with A = Sᵀ."""
    sd = authors_state_dict(dtype=torch.float32, dead=())
    for i in range(nD):  # make their S exactly skew so both formulas are comparable
        S = sd[f"S_param_Double.{i}"]
        sd[f"S_param_Double.{i}"] = S - S.transpose(-1, -2)
    adapter, _ = import_authors_state_dict(sd, threshold=0.0)
    blk = adapter.block("double", 1)
    q = torch.randn(1, H, 5, D)
    q2, _ = saferope_qk(q, q, blk, txt_len=5, threshold=0.0)
    U = sd["_U_query_cache_D"][1]  # (H, D, r)
    S = sd["S_param_Double.1"]
    x = q[0].transpose(0, 1)  # (L, H, D) -> their (seq, heads, dim) layout
    c = torch.einsum("lhd,hdr->hlr", x, U)  # row coefficients (H, L, r)
    rho = (c.square().sum(-1) / x.transpose(0, 1).square().sum(-1)).clamp(0, 1)  # (H, L)
    E = torch.matrix_exp(rho[..., None, None] * S[:, None])  # (H, L, r, r)
    c_rot = (c.unsqueeze(-2) @ E).squeeze(-2)  # row vector times exp(g S)
    theirs = x.transpose(0, 1) + torch.einsum("hlr,hdr->hld", c_rot - c, U)  # (H, L, D)
    assert torch.allclose(q2[0], theirs, atol=1e-5)


def test_pth_round_trip_through_our_format(tmp_path):
    sd = authors_state_dict()
    torch.save(sd, tmp_path / "rotary_adapter_s_param.pth")
    adapter, report = load_authors_checkpoint(tmp_path / "rotary_adapter_s_param.pth", concepts=("nudity",))
    adapter.save(tmp_path / "converted.safetensors")
    back = load_adapter(tmp_path / "converted.safetensors")
    assert back.block_keys() == adapter.block_keys()
    assert back.meta.concepts == ("nudity",) and back.meta.config["single_segments"] == ["img", "txt"]
    for key in adapter.blocks:
        assert torch.equal(back.blocks[key].U_k, adapter.blocks[key].U_k)


def test_non_weights_only_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(AdapterFormatError, match="weights-only"):
        load_authors_checkpoint(tmp_path / "evil.pth")


def test_wrong_layouts_are_rejected():
    with pytest.raises(AdapterFormatError, match="not the authors' RotaryAdapter layout"):
        import_authors_state_dict({"weight": torch.zeros(2)})
    sd = authors_state_dict()
    sd["S_param_Double.0"] = torch.zeros(H, r + 1, r + 1)
    with pytest.raises(AdapterFormatError, match="S_param_Double.0 has shape"):
        import_authors_state_dict(sd)
    sd = authors_state_dict()
    sd["S_param_Single.1"] = sd["S_param_Single.1"].float().masked_fill(torch.ones(2, H, r, r, dtype=torch.bool), float("nan"))
    with pytest.raises(AdapterFormatError, match="non-finite"):
        import_authors_state_dict(sd)
