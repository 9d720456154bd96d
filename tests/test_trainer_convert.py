"""``convert`` of a synthetic checkpoint in the authors' layout, through ``inspect`` and ``load_adapter``."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.usefixtures("single_thread")

ND, NS, H, D, R = 2, 2, 2, 16, 3


def _orthonormal(gen: torch.Generator, *shape: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(*shape, D, R, generator=gen, dtype=torch.float64))
    return q.to(torch.float16)  # the authors store fp16 bases


def authors_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The RotaryAdapter layout: S_param_Double.{i} (H,r,r), S_param_Single.{i} (2,H,r,r), U caches."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for i in range(ND):
        S = torch.randn(H, R, R, generator=g)
        sd[f"S_param_Double.{i}"] = S - S.transpose(-1, -2) + 0.01 * torch.randn(H, R, R, generator=g)  # not exactly skew
    for i in range(NS):
        S = torch.randn(2, H, R, R, generator=g)
        sd[f"S_param_Single.{i}"] = S - S.transpose(-1, -2)
    for w in ("query", "key"):
        uD, uS = _orthonormal(g, ND, H), _orthonormal(g, NS, H)
        uD[1, 0] = 0  # head 0 of double block 1 was excluded by the authors: all-zero basis
        sd[f"_U_{w}_cache_D"], sd[f"_U_{w}_cache_S"] = uD, uS
    return sd


def test_convert_round_trips_through_inspect_and_load(tmp_path, cli, tiny_flux):
    from saferope_engine import load_adapter

    sd = authors_state_dict()
    src, out = tmp_path / "rotary_adapter_s_param.pth", tmp_path / "nudity.safetensors"
    torch.save(sd, src)
    code, stdout, err = cli("convert", src, out, "--threshold", "0.7")
    assert code == 0, err
    assert "discarded symmetric part" in stdout and "dropped heads" in stdout and "double.1: [0]" in stdout

    adapter = load_adapter(out)
    m = adapter.meta
    assert (m.num_heads, m.head_dim, m.blocks["double"], m.blocks["single"], m.rank) == (H, D, ND, NS, R)
    assert m.threshold == pytest.approx(0.7) and m.concepts == ("nudity",)
    assert adapter.block("double", 1).heads.tolist() == [1]
    # Our generator is the skew part of the authors' Sᵀ; single [0] -> image, [1] -> text.
    S = sd["S_param_Double.0"].double()
    torch.testing.assert_close(adapter.block("double", 0).A_txt.double(), 0.5 * (S.transpose(-1, -2) - S),
                               rtol=1e-5, atol=1e-6)
    S1 = sd["S_param_Single.1"].double()
    torch.testing.assert_close(adapter.block("single", 1).A_img.double(), 0.5 * (S1[0].transpose(-1, -2) - S1[0]),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adapter.block("single", 1).A_txt.double(), 0.5 * (S1[1].transpose(-1, -2) - S1[1]),
                               rtol=1e-5, atol=1e-6)

    code, stdout, _ = cli("inspect", "--json", out)
    assert code == 0
    summary = json.loads(stdout)
    assert summary["rank"] == R and summary["num_heads_patched"] == ND * H + NS * H - 1
    assert {b["block"]: b["heads"] for b in summary["blocks"]}["double.1"] == [1]
    norms = {b["block"]: b["generator_norms"] for b in summary["blocks"]}
    expect = float(torch.linalg.matrix_norm(adapter.block("double", 0).A_txt[0]))
    assert norms["double.0"]["txt"][0] == pytest.approx(expect, rel=1e-5)

    # The converted adapter fits the tiny FLUX (same shapes) and patches it.
    from diffusers import FluxTransformer2DModel

    from saferope_engine.diffusers import apply_saferope

    transformer = FluxTransformer2DModel.from_pretrained(str(tiny_flux / "transformer"))
    handle = apply_saferope(transformer, adapter)
    handle.remove()


def test_convert_rejects_bad_inputs(tmp_path, cli):
    out = tmp_path / "a.safetensors"
    code, _, err = cli("convert", tmp_path / "missing.pth", out)
    assert code == 2 and "not found" in err and len(err.strip().splitlines()) == 1
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    code, _, err = cli("convert", junk, out)
    assert code == 1 and "weights-only" in err and len(err.strip().splitlines()) == 1
    other = tmp_path / "other.pth"
    torch.save({"something": torch.zeros(2)}, other)
    code, _, err = cli("convert", other, out)
    assert code == 1 and "RotaryAdapter layout" in err
    assert not out.exists()
    good = tmp_path / "good.pth"
    torch.save(authors_state_dict(), good)
    out.write_bytes(b"keep me")
    code, _, err = cli("convert", good, out)
    assert code == 2 and "--force" in err and out.read_bytes() == b"keep me"
    code, _, err = cli("convert", good, out, "--force")
    assert code == 0, err
