"""Scenarios that ``family_driver.py`` runs for every family's tiny model inside ComfyUI.

Each returns plain data for ``test_comfy_families.py``: exact max-abs differences (so the tests can
demand bit-identity), error types and messages, what the hooks saw. Tensors are compared here.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import family_models as fm
import torch
from driver_scenarios import error_of, maxdiff  # the main driver's record helpers

SCENARIOS: dict[str, Callable[[Case], dict]] = {}
#: Scenarios for models SafeRoPE must refuse; every other scenario needs a supported family.
UNSUPPORTED_SCENARIOS = ("unsupported",)


def scenario(fn: Callable[[Case], dict]) -> Callable[[Case], dict]:
    """Register ``fn`` as a scenario under its name (the key of its record in the JSON)."""
    SCENARIOS[fn.__name__] = fn
    return fn


def applies(name: str, c: Case) -> bool:
    """Whether scenario ``name`` is meaningful for case ``c`` (models of no family get only ``unsupported``)."""
    if c.tiny.family is None:
        return name in UNSUPPORTED_SCENARIOS
    return name not in UNSUPPORTED_SCENARIOS


def state(model: Any) -> str:
    """A fingerprint of everything Apply could have touched on a ModelPatcher."""
    to = model.model_options.get("transformer_options", {})
    return json.dumps({
        "patches": {k: [id(p) for p in v] for k, v in to.get("patches", {}).items()},
        "patches_replace": {k: sorted(map(str, v)) for k, v in to.get("patches_replace", {}).items()},
        "object_patches": {k: id(v) for k, v in model.object_patches.items()},
        "wrappers": {t: {k: [id(w) for w in ws] for k, ws in d.items()} for t, d in model.wrappers.items()},
        "model_options_keys": sorted(model.model_options), "to_keys": sorted(to),
    }, sort_keys=True)


def weights_digest(model: Any) -> float:
    """A cheap fingerprint of the diffusion model's weights (sum of |w| in float64; any in-place edit shows)."""
    return float(sum(p.detach().double().abs().sum() for p in model.model.diffusion_model.parameters()))


@dataclass
class Env:
    """What every case shares: ComfyUI's ``nodes``, the pack as ComfyUI loaded it, the adapter folder."""

    work: Path
    nodes: ModuleType
    pack: ModuleType
    adapter_dir: Path

    @classmethod
    def create(cls, work: Path) -> Env:
        import folder_paths

        import nodes

        pack = sys.modules[nodes.NODE_CLASS_MAPPINGS["SafeRoPEApply"].__module__.rsplit(".nodes.", 1)[0]]
        adapter_dir = work / "adapters"
        adapter_dir.mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path("saferope", str(adapter_dir))  # like an extra_model_paths entry
        return cls(work, nodes, pack, adapter_dir)

    @property
    def engine(self) -> ModuleType:
        return self.pack.saferope_engine

    def node(self, name: str) -> Any:
        return self.nodes.NODE_CLASS_MAPPINGS[name]()


@dataclass
class Case:
    """One tiny model in this ComfyUI, with its concept adapter (supported families) and what it is."""

    env: Env
    tiny: fm.Tiny
    model: Any
    adapter_name: str | None = None  # the concept adapter
    probe_name: str | None = None  # every text-carrying block scored, nothing rotated (split checks)
    info: dict = field(default_factory=dict)

    @classmethod
    def create(cls, env: Env, tiny: fm.Tiny) -> Case:
        model = fm.build(tiny)
        c = cls(env, tiny, model)
        c.info = {"case": tiny.case, "family": tiny.family, "model_class": type(model.model).__name__,
                  "config_class": type(model.model.model_config).__name__,
                  "diffusion_model": type(model.model.diffusion_model).__name__}
        if tiny.family is None:
            return c
        fi = env.pack.nodes.compat.comfy_model(model)
        adapter, probe, calib = fm.concept_adapter(env.nodes, env.engine, model, tiny)
        c.adapter_name, c.probe_name = f"{tiny.case}.safetensors", f"{tiny.case}_probe.safetensors"
        adapter.save(env.adapter_dir / c.adapter_name)
        probe.save(env.adapter_dir / c.probe_name)
        c.info.update({"detected": fi.family.id, "attn1": fi.attn1_patch, "num_heads": fi.shapes.num_heads,
                       "head_dim": fi.shapes.head_dim, "num_kv_heads": fi.shapes.num_kv_heads,
                       "blocks": dict(fi.shapes.blocks), "calibration": calib,
                       "modes": ["attn1", "object"] if fi.attn1_patch else ["object"],
                       "hook_files": c.hook_files()})
        return c

    # -- helpers ------------------------------------------------------------------------------
    @property
    def family(self) -> Any:
        return self.env.engine.arch.get(self.tiny.family)

    def hook_files(self) -> dict[str, str]:
        """Source file of each class a block kind's attn1_patch call would come from (the registry's path)."""
        import inspect

        dm = self.model.model.diffusion_model
        out = {}
        for hk in self.family.comfy.kinds:
            blocks = self.env.engine.arch.resolve_attr(dm, hk.blocks)
            if hk.attn1 and len(blocks):
                mod = self.env.engine.arch.resolve_attr(blocks[0], hk.attn1[1])
                out[type(mod).__name__] = inspect.getsourcefile(type(mod))
        return out

    def adapter(self, name: str | None = None) -> Any:
        return self.env.node("SafeRoPEAdapterLoader").load(name or self.adapter_name)[0]

    def apply(self, model: Any = None, strength: float = 1.0, start: float = 0.0, end: float = 1.0,
              mode: str | None = None, adapter: Any = None) -> Any:
        model = self.model if model is None else model
        a = self.adapter() if adapter is None else adapter
        if mode is None:  # the node, as a workflow runs it
            return self.env.node("SafeRoPEApply").apply(model, a, strength, -1.0, start, end)[0]
        return self.env.pack.nodes.install.apply_saferope(model, a, strength=strength, start_percent=start,
                                                          end_percent=end, mode=mode)

    def cond(self, unsafe: bool, seed: int = 1, length: int = 10) -> list:
        return fm.conditioning(self.tiny, seed, concept=unsafe, length=length)

    def sample(self, model: Any, pos: list, neg: list | None = None, **kw: Any) -> torch.Tensor:
        return fm.sample(self.env.nodes, model, self.tiny, pos, neg, **kw)

    def layout(self, cond: list) -> fm.Layout:
        """Where the text and the concept tokens of ``cond`` sit in this model (observed, one step)."""
        calls = fm.observe(self.model, self.family, lambda m: self.sample(m, cond, steps=1, cfg=1.0))
        return fm.layout_of(calls[0], self.family, cond[0][0])


# -- supported families -----------------------------------------------------------------------------
@scenario
def hooks(c: Case) -> dict:
    """Whether this ComfyUI calls attn1_patch for every block, as the pack detected — observed with a counting patch."""
    seen: dict[str, list] = {}

    def count(q, k, v, pe=None, attn_mask=None, extra_options=None, **_):
        opts = extra_options or {}
        seen.setdefault(str(opts.get("block_type")), []).append(
            [opts.get("block_index"), list(opts.get("img_slice") or []), int(q.shape[2])])
        return {}

    m = c.model.clone()
    m.set_model_attn1_patch(count)
    c.sample(m, c.cond(False), steps=1, cfg=1.0)
    expected = {hk.attn1[0]: c.info["blocks"][hk.kind] for hk in c.family.comfy.kinds if hk.attn1}
    return {"detected": c.info["attn1"], "calls": seen, "expected_blocks": expected,
            "layout": {k: list(v) for k, v in c.layout(c.cond(True)).spans.items()}}


@scenario
def protect(c: Case) -> dict:
    """Base vs protected (the Apply node's own mode); the original MODEL before/after."""
    safe, unsafe = c.cond(False), c.cond(True)
    before, digest = state(c.model), weights_digest(c.model)
    base_s, base_u = c.sample(c.model, safe), c.sample(c.model, unsafe)
    prot = c.apply()
    p_s, p_u = c.sample(prot, safe), c.sample(prot, unsafe)
    again_s, again_u = c.sample(c.model, safe), c.sample(c.model, unsafe)
    return {"mode": c.env.pack.nodes.install.layers_of(prot)[0].mode,
            "safe_vs_base": maxdiff(p_s, base_s), "unsafe_vs_base": maxdiff(p_u, base_u),
            "repeat": maxdiff(c.sample(prot, unsafe), p_u), "base_scale": float(base_u.abs().max()),
            "finite": bool(torch.isfinite(p_u).all()),
            "original_after_safe": maxdiff(again_s, base_s), "original_after_unsafe": maxdiff(again_u, base_u),
            "original_state_unchanged": state(c.model) == before, "weights_unchanged": weights_digest(c.model) == digest,
            "clone_is_new": prot is not c.model,
            "original_has_no_saferope": not c.env.pack.nodes.install.layers_of(c.model)}


@scenario
def modes(c: Case) -> dict:
    """Every hook mode this ComfyUI offers for the family: gate, strength 0, and the modes agree."""
    safe, unsafe = c.cond(False, seed=3, length=12), c.cond(True, seed=3, length=12)
    base_s, base_u = c.sample(c.model, safe), c.sample(c.model, unsafe)
    res: dict = {}
    outs = {}
    for mode in c.info["modes"]:
        m = c.apply(mode=mode)
        outs[mode] = c.sample(m, unsafe)
        res[mode] = {"layer_mode": c.env.pack.nodes.install.layers_of(m)[0].mode,
                     "safe_vs_base": maxdiff(c.sample(m, safe), base_s), "unsafe_vs_base": maxdiff(outs[mode], base_u),
                     "strength0_vs_base": maxdiff(c.sample(c.apply(mode=mode, strength=0.0), unsafe), base_u)}
    if "attn1" in outs:
        res["object_vs_attn1"] = maxdiff(outs["object"], outs["attn1"])
        res["scale"] = float(outs["attn1"].abs().max())
    else:
        res["attn1_forced"] = error_of(lambda: c.apply(mode="attn1"))
    return res


@scenario
def sampling_range(c: Case) -> dict:
    unsafe = c.cond(True, seed=6)
    base = c.sample(c.model, unsafe, steps=3)
    full = c.sample(c.apply(), unsafe, steps=3)
    never = c.sample(c.apply(start=1.0, end=1.0), unsafe, steps=3)
    late = c.sample(c.apply(start=0.5, end=1.0), unsafe, steps=3)
    return {"full_vs_base": maxdiff(full, base), "never_vs_base": maxdiff(never, base),
            "late_vs_base": maxdiff(late, base), "late_vs_full": maxdiff(late, full),
            "start_after_end": error_of(lambda: c.apply(start=0.8, end=0.2))}


def _risk_columns(c: Case, model: Any, cond: list) -> list[dict]:
    """One Euler step from pure noise with the pack's risk collector: gated text tokens per patched block."""
    import comfy.sample
    import comfy.samplers

    risk = c.env.pack.nodes.risk
    latent = fm.sample_latent(model, c.tiny)
    ms = model.get_model_object("model_sampling")
    collector = risk.RiskCollector()
    with c.env.pack.nodes.patch.collect_risk(collector):
        comfy.sample.sample_custom(model, comfy.sample.prepare_noise(latent, 0), 1.0,
                                   comfy.samplers.sampler_object("euler"), torch.tensor([float(ms.sigma_max), 0.0]),
                                   cond, cond, latent, disable_pbar=True, seed=0)
    report = collector.report(c.env.pack.nodes.install.layers_of(model))
    return [{"kind": col.kind, "index": col.index, "txt_len": int((~col.txt_rho.isnan()).sum()),
             "gated": col.txt_gated.nonzero().flatten().tolist(),
             "max_rho": float(col.txt_rho.nan_to_num(0.0).max()) if col.txt_rho.numel() else 0.0}
            for col in report.columns]


@scenario
def visualizer(c: Case) -> dict:
    """The LRS Visualizer node on this family, and the token split it reports, in every hook mode."""
    unsafe, safe = c.cond(True, seed=17), c.cond(False, seed=17)
    lay = c.layout(unsafe)
    px = fm.latent_pixels(c.model, c.tiny)
    res: dict = {"expected_triggers": lay.triggers, "spans": {k: list(v) for k, v in lay.spans.items()}, "pixels": px}
    for mode in c.info["modes"]:
        m = c.apply(mode=mode)
        img_u, text_u = c.env.node("SafeRoPELRSVisualizer").visualize(m, unsafe, px, px, 0.0, 0)[:2]
        _, text_s = c.env.node("SafeRoPELRSVisualizer").visualize(m, safe, px, px, 0.0, 0)[:2]
        res[mode] = {"unsafe_summary": text_u, "safe_summary": text_s, "image_shape": list(img_u.shape),
                     "image_range": [float(img_u.min()), float(img_u.max())],
                     "unsafe_columns": _risk_columns(c, m, unsafe), "safe_columns": _risk_columns(c, m, safe)}
    return res


@scenario
def split(c: Case) -> dict:
    """The token split at every hook site, in every mode: the text risk the pack reports per block equals the
    risk computed here from the observed QK-norm outputs of the same call, with the text where the model put it."""
    import comfy.sample
    import comfy.samplers

    probe = c.adapter(c.probe_name)
    res: dict = {}
    for mode in c.info["modes"]:
        m = c.apply(adapter=probe, mode=mode)
        cond = c.cond(True, seed=21, length=11)
        collector = c.env.pack.nodes.risk.RiskCollector()
        latent = fm.sample_latent(m, c.tiny)
        sigma = float(m.get_model_object("model_sampling").sigma_max)

        def run(clone: Any) -> None:
            with c.env.pack.nodes.patch.collect_risk(collector):
                comfy.sample.sample_custom(clone, comfy.sample.prepare_noise(latent, 0), 1.0,
                                           comfy.samplers.sampler_object("euler"), torch.tensor([sigma, 0.0]),
                                           cond, cond, latent, disable_pbar=True, seed=0)

        obs = fm.observe(m, c.family, run)[0]
        lay = fm.layout_of(obs, c.family, cond[0][0])
        report = collector.report(c.env.pack.nodes.install.layers_of(m))
        cols = []
        for col in report.columns:
            block = probe.block(col.kind, col.index)
            txt_len, img_first = lay.spans[col.kind]
            rhos = []
            for which in ("q", "k"):
                x = obs.norms[(col.kind, col.index, which)]  # (B, H, L, D)
                heads = block.heads if which == "q" else block.k_heads
                U = block.U_q if which == "q" else block.U_k
                xs = x[:, heads]
                rho = (xs @ U).square().sum(-1) / xs.square().sum(-1).clamp_min(1e-12)  # (B, n, L)
                a = x.shape[2] - txt_len if img_first else 0
                rhos.append(rho[:, :, a:a + txt_len].amax(dim=(0, 1)))
            expected = torch.stack(rhos).amax(0).clamp(0, 1)
            got = col.txt_rho[:txt_len]
            cols.append({"block": f"{col.kind}.{col.index}", "txt_len": txt_len, "img_first": img_first,
                         "reported_txt_len": int((~col.txt_rho.isnan()).sum()),
                         "max_abs": float((got - expected).abs().max()) if txt_len else 0.0,
                         "gated": int(col.txt_gated.sum())})
        res[mode] = {"columns": cols, "patched": [f"{k}.{i}" for k, i in probe.block_keys()]}
    return res


@scenario
def wrong_family(c: Case) -> dict:
    """An adapter of another family with this model's heads, head size and (shared) block counts."""
    engine = c.env.engine
    a = c.adapter()
    other = "flux2" if c.tiny.family == "flux1" else "flux1"
    kinds = engine.arch.get(other).kind_names
    m = a.meta
    meta = engine.AdapterMeta(num_heads=m.num_heads, head_dim=m.head_dim, rank=m.rank, arch=other,
                              blocks={k: m.blocks.get(k, 0) for k in kinds}, threshold=m.threshold)
    foreign = engine.SafeRoPEAdapter(meta, [b for b in a.blocks.values() if b.kind in kinds], validate=False)
    return {"other": other, "equal_shapes": {k: m.blocks.get(k, 0) for k in kinds},
            "node": error_of(lambda: c.apply(adapter=foreign)),
            "object_mode": error_of(lambda: c.apply(adapter=foreign, mode="object"))}


def _skip_block(c: Case, model: Any) -> str:
    """Make another node skip the adapter's first patched block on ``model``; returns how."""
    kind, idx = c.adapter().block_keys()[0]
    hk = next(h for h in c.family.comfy.kinds if h.kind == kind)
    if c.tiny.family in ("flux1", "flux2", "chroma", "hunyuan_image", "qwen_image"):
        name = "double_block" if kind == "double" else "single_block"

        def skip(args, extra):  # a cache that returns the block's inputs
            return {k: args[k] for k in ("img", "txt") if k in args}

        model.set_model_patch_replace(skip, "dit", name, idx)
        return f"patches_replace dit {name} {idx}"
    path = f"diffusion_model.{hk.blocks}.{idx}.forward"
    model.add_object_patch(path, lambda x, *a, **k: x)  # a block whose forward returns its input
    return f"object patch {path}"


@scenario
def fail_closed(c: Case) -> dict:
    """Hooks removed from a protected clone, or a patched block skipped, raise instead of sampling unprotected."""
    patch = c.env.pack.nodes.patch
    unsafe, safe = c.cond(True, seed=9), c.cond(False, seed=9)
    res: dict = {}
    for mode in c.info["modes"]:
        prot = c.apply(mode=mode)
        broken = prot.clone()
        if mode == "attn1":
            ps = broken.model_options["transformer_options"]["patches"]
            ps["attn1_patch"] = [p for p in ps["attn1_patch"] if not isinstance(p, patch.Attn1Patch)]
        else:
            for key in [k for k, v in broken.object_patches.items() if isinstance(v, patch.NormPatch)]:
                del broken.object_patches[key]
        skipped = prot.clone()
        how = _skip_block(c, skipped)
        res[mode] = {"hooks_removed_unsafe": error_of(lambda: c.sample(broken, unsafe)),
                     "hooks_removed_safe": error_of(lambda: c.sample(broken, safe)),
                     "block_skipped": error_of(lambda: c.sample(skipped, unsafe)), "skipped_how": how,
                     "first_block": "{}.{}".format(*c.adapter().block_keys()[0]),
                     "after_ok": error_of(lambda: c.sample(prot, unsafe))}
    return res


@scenario
def parity(c: Case) -> dict:
    """The same weights in diffusers (through ComfyUI's key map) and ComfyUI, without and with the adapter."""
    import comfy.patcher_extension

    dif = importlib.import_module(c.env.engine.__name__ + ".diffusers")
    try:
        twin, how = fm.diffusers_twin(c.tiny, c.model)
    except fm.NoKeyMap as e:  # recorded: the tests check the reason is real where they expect no parity
        return {"unavailable": str(e)}
    unsafe = c.cond(True, seed=8)
    out = {}
    for name, protected in (("base", False), ("adapter", True)):
        m = (c.apply() if protected else c.model).clone()
        seen: list = []

        def capture(executor, *args, **kwargs):
            res = executor(*args, **kwargs)
            if not seen:
                seen.append(([a.clone() if isinstance(a, torch.Tensor) else a for a in args], dict(kwargs), res.clone()))
            return res

        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_capture", capture)
        c.sample(m, unsafe, steps=1, cfg=1.0)
        args, kwargs, comfy_out = seen[0]
        handle = dif.apply_saferope(twin, c.adapter()) if protected else None
        try:
            dif_out = fm.diffusers_call(c.tiny, twin, args, kwargs)
        finally:
            if handle is not None:
                handle.remove()
        out[name] = (comfy_out.reshape(dif_out.shape), dif_out)
    res: dict = {"key_map": how}
    for name, (a, b) in out.items():
        res[name] = {"max_abs": maxdiff(a, b), "scale": float(b.abs().max())}
    dc, dd = out["adapter"][0] - out["base"][0], out["adapter"][1] - out["base"][1]
    res["delta_norm"] = float(dd.norm())
    res["delta_rel"] = float((dc - dd).norm() / dd.norm().clamp_min(1e-30))
    return res


# -- models of no supported family ------------------------------------------------------------------
@scenario
def unsupported(c: Case) -> dict:
    """Apply on a model no family claims: an error naming what was found, before anything is installed."""
    engine = c.env.engine
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(2, 128, fm.RANK, generator=g))[0]  # (heads, head_dim, rank) orthonormal
    A = torch.randn(2, fm.RANK, fm.RANK, generator=g)
    meta = engine.AdapterMeta(num_heads=2, head_dim=128, rank=fm.RANK, blocks={"double": 1, "single": 0}, arch="flux1")
    adapter = engine.SafeRoPEAdapter(meta, [engine.BlockAdapter("double", 0, torch.arange(2), U, U.clone(), A - A.mT, None)])
    before = state(c.model)
    return {**c.info, "apply": error_of(lambda: c.env.node("SafeRoPEApply").apply(c.model, adapter, 1.0, -1.0, 0.0, 1.0)),
            "object_mode": error_of(lambda: c.env.pack.nodes.install.apply_saferope(c.model, adapter, mode="object")),
            "state_unchanged": state(c.model) == before}
