"""Apply on a clone: hook choice, per-clone bookkeeping and fail-closed, without ComfyUI.

ComfyUI's ModelPatcher and Flux model are stood in for by the smallest objects with the same
surface the pack touches (``clone``, ``get_model_object``, ``object_patches``/``add_object_patch``,
``model_options``/``set_model_attn1_patch``, ``wrappers``/``add_wrapper_with_key``,
``model_sampling.percent_to_sigma``) and the module layout of ``comfy.ldm.flux``
(``double_blocks.i.{img,txt}_attn.norm``, ``single_blocks.j.norm``). :func:`run` calls the model
the way ComfyUI does: object patches set on the modules while loaded, DIFFUSION_MODEL wrappers
around the forward, attn1_patch called between QK-norm and RoPE where the block class does.
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
from saferope_pack.nodes.compat import comfy_model, diffusion_model_wrapper_type  # noqa: E402
from saferope_pack.nodes.install import apply_saferope, layers_of  # noqa: E402
from saferope_pack.nodes.patch import NormPatch  # noqa: E402
from saferope_pack.saferope_engine import ModelShapes  # noqa: E402
from saferope_pack.saferope_engine.errors import HookNotRunError, IncompatibleAdapterError, SafeRoPEError, UnsupportedModelError  # noqa: E402
from test_nodes_patch import NUM_DOUBLE, NUM_SINGLE, D, H, QKNorm, make_adapter, risky  # noqa: E402

T, N = 5, 8


class Attn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = QKNorm()


class OldDouble(torch.nn.Module):
    """A double block of a ComfyUI that does not call attn1_patch (before ~0.17)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.img_attn, self.txt_attn = H, Attn(), Attn()

    def forward(self, tq, tk, iq, ik, opts):
        tq, tk = self.txt_attn.norm(tq, tk, tq)
        iq, ik = self.img_attn.norm(iq, ik, iq)
        return torch.cat([tq, iq], 2), torch.cat([tk, ik], 2)  # text first


class NewDouble(OldDouble):
    """A double block that calls transformer_options["patches"]["attn1_patch"] before RoPE."""

    def forward(self, tq, tk, iq, ik, opts):
        q, k = OldDouble.forward(self, tq, tk, iq, ik, opts)
        for p in opts.get("patches", {}).get("attn1_patch", []):
            out = p(q, k, q, pe=None, attn_mask=None, extra_options=dict(opts, img_slice=[tq.shape[2], q.shape[2]]))
            q, k = out.get("q", q), out.get("k", k)
        return q, k


class OldSingle(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.norm = H, QKNorm()

    def forward(self, q, k, opts):
        return self.norm(q, k, q)


class NewSingle(OldSingle):
    def forward(self, q, k, opts):
        q, k = OldSingle.forward(self, q, k, opts)
        for p in opts.get("patches", {}).get("attn1_patch", []):
            out = p(q, k, q, pe=None, attn_mask=None, extra_options=opts)
            q, k = out.get("q", q), out.get("k", k)
        return q, k


# The block classes under ComfyUI's names (the registry checks the structure by class name).
BLOCKS = {True: (type("DoubleStreamBlock", (NewDouble,), {}), type("SingleStreamBlock", (NewSingle,), {})),
          False: (type("DoubleStreamBlock", (OldDouble,), {}), type("SingleStreamBlock", (OldSingle,), {}))}


class FluxNet(torch.nn.Module):
    """Stand-in for ``comfy.ldm.flux.model.Flux``."""

    def __init__(self, new: bool, heads: int = H) -> None:
        super().__init__()
        double, single = BLOCKS[new]
        self.double_blocks = torch.nn.ModuleList([double() for _ in range(NUM_DOUBLE)])
        self.single_blocks = torch.nn.ModuleList([single() for _ in range(NUM_SINGLE)])
        for b in list(self.double_blocks) + list(self.single_blocks):
            b.num_heads = heads


class Sampling:
    def percent_to_sigma(self, p: float) -> float:  # FLUX's ModelSamplingFlux with shift 1: sigma = 1 - p
        return 1.0 - p


class Flux(torch.nn.Module):
    """Stand-in for ``comfy.model_base.Flux`` (its class name identifies the family)."""

    def __init__(self, new: bool) -> None:
        super().__init__()
        self.diffusion_model = FluxNet(new)
        self.model_sampling = Sampling()


Base = Flux


class Patcher:
    """ModelPatcher's per-clone state: copies of dicts and lists, shared weights."""

    def __init__(self, model: Base) -> None:
        self.model, self.object_patches, self.model_options, self.wrappers = model, {}, {"transformer_options": {}}, {}

    def clone(self) -> Patcher:
        n = Patcher(self.model)
        n.object_patches = dict(self.object_patches)
        n.model_options = copy.deepcopy(self.model_options)
        n.wrappers = {t: {k: list(v) for k, v in d.items()} for t, d in self.wrappers.items()}
        return n

    def get_model_object(self, name: str):
        obj = self.model
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def set_model_attn1_patch(self, patch):
        to = self.model_options["transformer_options"]
        to.setdefault("patches", {})
        to["patches"]["attn1_patch"] = to["patches"].get("attn1_patch", []) + [patch]

    def add_wrapper_with_key(self, wrapper_type, key, fn):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(fn)


def run(patcher: Patcher, q: torch.Tensor, k: torch.Tensor, sigma: float = 0.5) -> dict:
    """One model call as ComfyUI makes it; returns the q/k each block hands to attention."""
    dm = patcher.model.diffusion_model
    backup = {}
    for key, fn in patcher.object_patches.items():  # ModelPatcher.patch_model
        path, attr = key.rsplit(".", 1)
        mod = patcher.get_model_object(path)
        backup[key] = mod.__dict__.get(attr)
        setattr(mod, attr, fn)
    opts = dict(patcher.model_options["transformer_options"], sigmas=torch.tensor([sigma]))
    wrappers = [w for ws in patcher.wrappers.get(diffusion_model_wrapper_type(), {}).values() for w in ws]

    def forward(x, timestep, context, y, guidance, ref, control, transformer_options):
        out, o = {}, dict(transformer_options)
        for i, b in enumerate(dm.double_blocks):
            o.update(block_type="double", block_index=i)
            out[("double", i)] = b(q[:, :, :T], k[:, :, :T], q[:, :, T:], k[:, :, T:], o)
        o["img_slice"] = [T, T + N]
        for i, b in enumerate(dm.single_blocks):
            o.update(block_type="single", block_index=i)
            out[("single", i)] = b(q, k, o)
        return out

    def at(i):
        return (lambda *a, **kw: forward(*a, **kw)) if i == len(wrappers) else (lambda *a, **kw: wrappers[i](at(i + 1), *a, **kw))

    try:
        return at(0)(torch.zeros(1), torch.tensor([sigma]), torch.zeros(1, T, 4), None, None, None, None, opts)
    finally:
        for key, old in backup.items():  # ModelPatcher.unpatch_model
            path, attr = key.rsplit(".", 1)
            mod = patcher.get_model_object(path)
            if old is None:
                delattr(mod, attr)
            else:
                setattr(mod, attr, old)


#: (blocks call attn1_patch, mode passed to apply_saferope): both hooks where the blocks offer both
CASES = {"new-blocks-object": (True, None), "new-blocks-attn1": (True, "attn1"), "old-blocks-object": (False, None)}


@pytest.fixture(params=list(CASES))
def case(request) -> tuple[Patcher, str | None]:
    new, mode = CASES[request.param]
    return Patcher(Base(new=new)), mode


@pytest.fixture
def model(case) -> Patcher:
    return case[0]


@pytest.fixture
def mode(case) -> str | None:
    return case[1]


def test_object_patches_are_the_default_and_attn1_is_used_on_request(model, mode):
    info = comfy_model(model)
    assert info.shapes == ModelShapes("flux1", H, D, {"double": NUM_DOUBLE, "single": NUM_SINGLE})
    p = apply_saferope(model, make_adapter(), mode=mode)
    assert layers_of(p)[0].mode == (mode or "object")
    if mode == "attn1":
        assert info.attn1_patch
        assert p.object_patches == {} and len(p.model_options["transformer_options"]["patches"]["attn1_patch"]) == 1
    else:  # on every ComfyUI, also where the blocks call attn1_patch (torch.compile sees object patches)
        assert "attn1_patch" not in p.model_options["transformer_options"].get("patches", {})
        assert set(p.object_patches) == {  # both streams of double.1, single.0, the text-length probe on the last double
            "diffusion_model.double_blocks.1.txt_attn.norm.forward", "diffusion_model.double_blocks.1.img_attn.norm.forward",
            "diffusion_model.double_blocks.2.txt_attn.norm.forward", "diffusion_model.single_blocks.0.norm.forward"}


def test_apply_works_on_a_clone_and_leaves_the_input_untouched(model, mode):
    before = (dict(model.object_patches), copy.deepcopy(model.model_options), copy.deepcopy(model.wrappers))
    p = apply_saferope(model, make_adapter(), mode=mode)
    assert p is not model and layers_of(p) and not layers_of(model)
    assert (model.object_patches, model.model_options, model.wrappers) == before


def test_protected_call_equals_the_engine_and_the_original_is_unchanged(model, mode):
    a = make_adapter()
    q, k = risky(a, "single", 0, T + N)
    base = run(model, q, k)
    prot = run(apply_saferope(model, a, mode=mode), q, k)
    nq, nk = base[("single", 0)]
    ref_q, _ = a.apply_qk("single", 0, nq, nk, txt_len=T)
    torch.testing.assert_close(prot[("single", 0)][0], ref_q, rtol=0, atol=1e-6)
    assert not torch.equal(ref_q, nq)
    assert torch.equal(prot[("double", 0)][0], base[("double", 0)][0])  # a block the adapter leaves alone
    again = run(model, q, k)
    assert all(torch.equal(again[key][0], base[key][0]) for key in base)


def test_two_apply_nodes_compose(model, mode):
    a, b = make_adapter(seed=0), make_adapter(seed=4, blocks=(("single", 0),), threshold=0.05)
    q, k = risky(a, "single", 0, T + N)
    both = run(apply_saferope(apply_saferope(model, a, mode=mode), b, mode=mode), q, k)[("single", 0)][0]
    nq, nk = run(model, q, k)[("single", 0)]
    qa, ka = a.apply_qk("single", 0, nq, nk, txt_len=T)
    qab, _ = b.apply_qk("single", 0, qa, ka, txt_len=T)
    torch.testing.assert_close(both, qab, rtol=0, atol=1e-6)
    assert not torch.equal(qab, qa)


def test_removed_hook_fails_closed(model, mode):
    p = apply_saferope(model, make_adapter(), mode=mode)
    p.object_patches.clear()
    p.model_options["transformer_options"].pop("patches", None)
    with pytest.raises(HookNotRunError, match="did not run"):
        run(p, *risky(make_adapter(), "single", 0, T + N))


def test_foreign_object_patch_on_a_norm_is_kept_and_run_first():
    m = Patcher(Base(new=False))
    key = "diffusion_model.single_blocks.0.norm.forward"
    norm, calls = m.get_model_object("diffusion_model.single_blocks.0.norm"), []
    m.add_object_patch(key, lambda q, k, v: (calls.append(1), type(norm).forward(norm, q, k, v))[1])
    p = apply_saferope(m, make_adapter())
    assert isinstance(p.object_patches[key], NormPatch) and p.object_patches[key].inner is m.object_patches[key]
    run(p, *risky(make_adapter(), "single", 0, T + N))
    assert calls == [1]


def test_outside_the_range_the_model_runs_unprotected_on_purpose(model, mode):
    a = make_adapter()
    q, k = risky(a, "single", 0, T + N)
    p = apply_saferope(model, a, start_percent=0.6, end_percent=1.0, mode=mode)  # sigma ≤ 0.4
    assert torch.equal(run(p, q, k, sigma=0.9)[("single", 0)][0], run(model, q, k, sigma=0.9)[("single", 0)][0])
    assert not torch.equal(run(p, q, k, sigma=0.3)[("single", 0)][0], run(model, q, k, sigma=0.3)[("single", 0)][0])


def test_incompatible_adapters_and_models_are_rejected(model):
    from test_nodes_patch import AdapterMeta, SafeRoPEAdapter

    a = make_adapter()
    wrong = SafeRoPEAdapter(AdapterMeta(num_heads=H, head_dim=D, blocks={"double": NUM_DOUBLE + 1, "single": NUM_SINGLE},
                                        rank=2), list(a.blocks.values()))
    with pytest.raises(IncompatibleAdapterError, match="double blocks: adapter 4, model 3"):
        apply_saferope(model, wrong)
    flux2 = SafeRoPEAdapter(AdapterMeta(**{**a.meta.__dict__, "arch": "flux2"}), list(a.blocks.values()))
    with pytest.raises(IncompatibleAdapterError, match=r"Flux.2 \(flux2\) and cannot protect a FLUX.1"):
        apply_saferope(model, flux2)  # equal shapes, other family
    bad = Patcher(Base(new=True))
    bad.model.diffusion_model.single_blocks[1].num_heads = H + 1
    with pytest.raises(IncompatibleAdapterError, match="disagree"):
        apply_saferope(bad, a)
    not_flux = Patcher(Base(new=True))
    del not_flux.model.diffusion_model.double_blocks
    with pytest.raises(UnsupportedModelError, match="no 'double_blocks'"):
        apply_saferope(not_flux, a)
    hidream = Patcher(type("HiDream", (torch.nn.Module,), {})())
    with pytest.raises(UnsupportedModelError, match="'HiDream'.*no hook before RoPE"):
        apply_saferope(hidream, a)
    with pytest.raises(TypeError, match="Load SafeRoPE Adapter"):
        apply_saferope(model, "adapter.safetensors")
    if not comfy_model(model).attn1_patch:
        with pytest.raises(SafeRoPEError, match="do not call attn1_patch"):
            apply_saferope(model, a, mode="attn1")


def test_apply_node_maps_threshold_and_range():
    node = PACK.NODE_CLASS_MAPPINGS["SafeRoPEApply"]()
    m = Patcher(Base(new=True))
    (p,) = node.apply(m, make_adapter(), 0.5, -1.0, 0.25, 0.75)
    lay = layers_of(p)[0]
    assert lay.threshold is None and lay.tau == 0.3 and lay.strength == 0.5
    assert (lay.sigma_start, lay.sigma_end) == (0.75, 0.25)
    (p,) = node.apply(m, make_adapter(), 1.0, 0.4, 0.0, 1.0)
    assert layers_of(p)[0].tau == 0.4
    with pytest.raises(ValueError, match="start_percent"):
        node.apply(m, make_adapter(), 1.0, -1.0, 0.8, 0.2)
