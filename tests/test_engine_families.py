"""The architecture registry and the diffusers integration, for every registered model family.

Each family's tiny transformer (tests/families.py) gets an adapter built from its own queries and
keys at a synthetic concept's tokens; then the gate fires on concept prompts only.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers integration needs diffusers (pip install .[trainer])")

from families import FAMILIES, concept_adapter, text  # noqa: E402

from saferope_engine import HookNotRunError, IncompatibleAdapterError, SafeRoPEAdapter, UnsupportedModelError, arch  # noqa: E402
from saferope_engine.adapter import AdapterMeta  # noqa: E402
from saferope_engine.diffusers import apply_saferope, model_shapes, observe_qk  # noqa: E402

NAMES = sorted(FAMILIES)


@pytest.fixture(scope="module")
def built():
    """{family: (model, adapter)}, built once (a second or two for all of them)."""
    torch.set_num_threads(1)
    out = {}
    for name in NAMES:
        model = FAMILIES[name].build(0)
        out[name] = (model, concept_adapter(FAMILIES[name], model))
    return out


def hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def run(name, model, *, concept: bool, seed: int = 5, batch: int = 1):
    fam = FAMILIES[name]
    with torch.no_grad():
        return fam.call(model, text(fam.text_dim, seed, concept=concept, batch=batch), 0)


def test_every_family_has_a_registry_entry_with_both_hosts():
    assert set(arch.ids()) == {"flux1", "flux2", "chroma", "hunyuan_image", "qwen_image", "z_image"}
    for a in arch.arches():
        assert a.comfy is not None and a.diffusers is not None, a.id
        assert a.models, f"{a.id}: the real models' sizes belong in the entry (README table)"


@pytest.mark.parametrize("name", NAMES)
def test_family_is_recognised_by_class_and_its_shapes_read_from_modules(name, built):
    model, _ = built[name]
    shapes = model_shapes(model)
    assert shapes.arch == name and shapes.num_heads == 2 and shapes.head_dim == 128
    assert set(shapes.blocks) == set(arch.get(name).kind_names)


@pytest.mark.parametrize("name", NAMES)
def test_gate_fires_only_on_concept_prompts_and_removal_restores(name, built):
    model, adapter = built[name]
    base_safe, base_unsafe = run(name, model, concept=False), run(name, model, concept=True)
    with apply_saferope(model, adapter):
        safe, unsafe = run(name, model, concept=False), run(name, model, concept=True)
        safe_b2 = run(name, model, concept=False, seed=6, batch=2)
    assert torch.equal(safe, base_safe)  # bit-identical: no token of a safe prompt is rotated
    assert (unsafe - base_unsafe).abs().max() > 1e-4 * base_unsafe.abs().max()
    assert torch.equal(safe_b2, run(name, model, concept=False, seed=6, batch=2))
    assert torch.equal(run(name, model, concept=True), base_unsafe)  # removed: base again
    assert hooks(model) == 0


@pytest.mark.parametrize("name", NAMES)
def test_strength_zero_equals_base_and_strength_scales(name, built):
    model, adapter = built[name]
    base = run(name, model, concept=True)
    with apply_saferope(model, adapter, strength=0.0):
        assert torch.equal(run(name, model, concept=True), base)
    with apply_saferope(model, adapter, strength=0.5):
        half = run(name, model, concept=True)
    with apply_saferope(model, adapter):
        full = run(name, model, concept=True)
    assert 0 < (half - base).abs().max() < (full - base).abs().max() * 1.5


@pytest.mark.parametrize("name", NAMES)
def test_an_adapter_of_another_family_with_equal_shapes_is_refused(name, built):
    model, adapter = built[name]
    other = "flux2" if name == "flux1" else "flux1"  # Flux-block families share kinds and, here, every shape
    m = adapter.meta
    blocks = {k: m.blocks.get(k, 0) for k in arch.get(other).kind_names}
    meta = AdapterMeta(num_heads=m.num_heads, head_dim=m.head_dim, rank=m.rank, blocks=blocks, arch=other)
    foreign = SafeRoPEAdapter(meta, [b for b in adapter.blocks.values() if b.kind in blocks], validate=False)
    with pytest.raises(IncompatibleAdapterError, match=f"cannot protect a .*\\({name}\\)"):
        apply_saferope(model, foreign)
    assert hooks(model) == 0


@pytest.mark.parametrize("name", NAMES)
def test_a_site_that_did_not_run_fails_closed(name, built):
    """A block whose attention skips its QK-norm (a cache, a replaced processor) makes the call raise."""
    model, adapter = built[name]
    host = arch.get(name).diffusers.kinds[-1]
    blocks = arch.resolve_attr(model, host.blocks)
    norm = arch.resolve_attr(blocks[len(blocks) - 1], host.norms[-1].path)
    parent_path, _, attr = host.norms[-1].path.rpartition(".")
    parent = arch.resolve_attr(blocks[len(blocks) - 1], parent_path)
    with apply_saferope(model, adapter):
        setattr(parent, attr, torch.nn.Identity())  # the attention now calls another module than the hooked norm
        try:
            with pytest.raises(HookNotRunError, match="did not run"):
                run(name, model, concept=True)
        finally:
            setattr(parent, attr, norm)
    assert hooks(model) == 0


@pytest.mark.parametrize("name", NAMES)
def test_stacked_adapters_apply_in_order_at_every_site(name, built):
    model, adapter = built[name]
    second = concept_adapter(FAMILIES[name], model, seed=11)
    with apply_saferope(model, adapter), apply_saferope(model, second):
        ab = run(name, model, concept=True)
    with apply_saferope(model, second), apply_saferope(model, adapter):
        ba = run(name, model, concept=True)
    with apply_saferope(model, adapter):
        a = run(name, model, concept=True)
    assert not torch.equal(ab, a) and not torch.allclose(ab, ba, atol=0, rtol=0)
    assert hooks(model) == 0


def test_joint_layouts_split_where_each_family_puts_its_text(built):
    """HunyuanImage's and Z-Image's diffusers models put the image first; the split follows the registry."""
    seen = {}
    for name in ("flux1", "hunyuan_image", "z_image"):
        model, _ = built[name]

        def obs(kind, index, which, x, txt_len, img_first, name=name):
            seen.setdefault((name, kind), set()).add((txt_len, img_first, x.shape[2]))

        with torch.no_grad(), observe_qk(model, obs):
            FAMILIES[name].call(model, text(24, 1, length=10), 0)
    assert (10, False, 10 + 16) in seen[("flux1", "single")]  # text first
    assert (10, True, 10 + 16) in seen[("hunyuan_image", "single")]  # [image, text]
    main = seen[("z_image", "main")]
    assert {f for _, f, _ in main} == {True} and all(t >= 10 and L - t >= 16 for t, _, L in main)  # padded streams


def test_unsupported_models_name_what_was_found():
    class HiDreamImageTransformer2DModel(torch.nn.Module):
        pass

    with pytest.raises(UnsupportedModelError, match="HiDreamImageTransformer2DModel.*no hook before RoPE.*Supported families"):
        apply_saferope(HiDreamImageTransformer2DModel(), None)
    with pytest.raises(UnsupportedModelError, match="'Linear'"):
        model_shapes(torch.nn.Linear(2, 2))


def test_zimage_omni_mode_is_refused(built):
    model, adapter = built["z_image"]
    with apply_saferope(model, adapter):
        with pytest.raises(UnsupportedModelError, match="omni mode"):
            model(x=[[torch.randn(4, 1, 8, 8)]], t=torch.tensor([0.5]), cap_feats=[[torch.randn(10, 24)]])
