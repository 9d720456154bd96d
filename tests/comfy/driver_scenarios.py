"""Scenarios run by comfy_driver.py inside ComfyUI. Each returns plain data for the tests.

Tensors are compared here (where they live); results carry exact max-abs differences, so the
tests can demand bit-identity (``== 0.0``) or a tolerance, and error types/messages.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import workflow_check as wc  # pure Python, imported with the driver (before its folder leaves sys.path)

SCENARIOS: dict[str, Callable[[Context], dict]] = {}
SECOND_TAU = 0.1


def scenario(fn: Callable[[Context], dict]) -> Callable[[Context], dict]:
    SCENARIOS[fn.__name__] = fn
    return fn


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact max |a - b| (0.0 means bit-identical values)."""
    return float((a.float() - b.float()).abs().max())


def error_of(fn: Callable[[], Any]) -> dict:
    """What ``fn()`` raised: type, its bases and the message (``raised: None`` when it returned)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return {"raised": type(e).__name__, "bases": [c.__name__ for c in type(e).__mro__], "message": str(e)}
    return {"raised": None}


@dataclass
class Context:
    work: Path
    nodes: ModuleType
    pack: ModuleType
    engine: ModuleType
    tinyflux: ModuleType
    assets: Any
    model: Any
    load_how: str

    @classmethod
    def create(cls, work: Path, driver_assets: ModuleType) -> Context:
        import folder_paths

        import nodes

        support = sys.modules[nodes.NODE_CLASS_MAPPINGS["SafeRoPETestTinyFlux"].__module__]
        pack = sys.modules[nodes.NODE_CLASS_MAPPINGS["SafeRoPEApply"].__module__.rsplit(".nodes.", 1)[0]]
        tinyflux = sys.modules[support.__name__ + ".tinyflux"]
        assets = driver_assets.build(work, tinyflux, pack.saferope_engine)
        folder_paths.add_model_folder_path("saferope", str(assets.adapter_dir))  # like an extra_model_paths entry
        model, how = tinyflux.load_tiny_flux(assets.comfy_sd)
        return cls(work, nodes, pack, pack.saferope_engine, tinyflux, assets, model, how)

    # -- helpers ------------------------------------------------------------------------------
    def info(self) -> dict:
        import comfyui_version

        fi = self.pack.nodes.compat.comfy_model(self.model)
        return {"version": comfyui_version.__version__, "load_how": self.load_how, "attn1": fi.attn1_patch,
                "family": fi.family.id, "shapes": {"num_heads": fi.shapes.num_heads, "head_dim": fi.shapes.head_dim,
                                                   "blocks": dict(fi.shapes.blocks)},
                "pack_module": self.pack.__name__, "pack_file": self.pack.__file__}

    def node(self, name: str) -> Any:
        return self.nodes.NODE_CLASS_MAPPINGS[name]()

    def adapter(self, name: str) -> Any:
        return self.node("SafeRoPEAdapterLoader").load(name)[0]

    def apply(self, model: Any, adapter: str | Any, strength: float = 1.0, threshold: float = -1.0,
              start: float = 0.0, end: float = 1.0) -> Any:
        a = self.adapter(adapter) if isinstance(adapter, str) else adapter
        return self.node("SafeRoPEApply").apply(model, a, strength, threshold, start, end)[0]

    def cond(self, unsafe: bool, seed: int = 1, length: int = 12, **extra: Any) -> list:
        from driver_assets import CONCEPT, TRIGGERS

        return self.tinyflux.conditioning(seed, length, concept=CONCEPT if unsafe else 0.0,
                                          triggers=TRIGGERS if unsafe else 0, spec=self.assets.spec, extra=extra)

    def sample(self, model: Any, pos: list, neg: list | None = None, *, seed: int = 0, steps: int = 3,
               cfg: float = 3.5, width: int = 64, height: int = 64) -> torch.Tensor:
        latent = {"samples": torch.zeros(1, 16, height // 8, width // 8)}
        neg = neg if neg is not None else self.cond(False, seed=99, length=7)
        out = self.node("KSampler").sample(model, seed, steps, cfg, "euler", "simple", pos, neg, latent, denoise=1.0)
        return out[0]["samples"].clone()


def _state(model: Any) -> str:
    """A fingerprint of everything Apply could have touched on a ModelPatcher."""
    to = model.model_options.get("transformer_options", {})
    return json.dumps({
        "patches": {k: [id(p) for p in v] for k, v in to.get("patches", {}).items()},
        "object_patches": {k: id(v) for k, v in model.object_patches.items()},
        "wrappers": {t: {k: [id(w) for w in ws] for k, ws in d.items()} for t, d in model.wrappers.items()},
        "model_options_keys": sorted(model.model_options), "to_keys": sorted(to),
    }, sort_keys=True)


# -- loading ----------------------------------------------------------------------------------------
@scenario
def load(c: Context) -> dict:
    import folder_paths

    import nodes

    ours = {k: nodes.NODE_DISPLAY_NAME_MAPPINGS.get(k) for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("SafeRoPE")}
    repo = str(Path(c.pack.__file__).resolve().parent)
    return {
        "nodes": ours,
        "relative_module": getattr(nodes.NODE_CLASS_MAPPINGS["SafeRoPEApply"], "RELATIVE_PYTHON_MODULE", None),
        "comfy_nodes_is_comfyui": hasattr(nodes, "KSampler") and hasattr(nodes, "init_extra_nodes"),
        "repo_on_sys_path": any(Path(p or ".").resolve() == Path(repo) for p in sys.path),
        "loaded_dirs": {k: v for k, v in getattr(nodes, "LOADED_MODULE_DIRS", {}).items()},
        "saferope_folders": folder_paths.get_folder_paths("saferope"),
        "saferope_extensions": sorted(folder_paths.folder_names_and_paths["saferope"][1]),
        "loader_choices": c.nodes.NODE_CLASS_MAPPINGS["SafeRoPEAdapterLoader"].INPUT_TYPES()["required"]["adapter_name"][0],
        "input_types": {k: json.loads(json.dumps(nodes.NODE_CLASS_MAPPINGS[k].INPUT_TYPES(), default=str))
                        for k in ours},
    }


@scenario
def loader_errors(c: Context) -> dict:
    out = {}
    for name in ("corrupt.safetensors", "no_metadata.safetensors", "absent.safetensors", "dangling.safetensors"):
        out[name] = error_of(lambda name=name: c.adapter(name))
    good = c.adapter("main.safetensors")
    out["good"] = {"blocks": len(good.blocks), "source": good.source}
    return out


# -- sampling ---------------------------------------------------------------------------------------
@scenario
def protect(c: Context) -> dict:
    """Base vs protected; the original MODEL before/after; the clone only changes the clone."""
    safe, unsafe = c.cond(False), c.cond(True)
    before = _state(c.model)
    base_safe, base_unsafe = c.sample(c.model, safe), c.sample(c.model, unsafe)
    prot = c.apply(c.model, "main.safetensors")
    p_safe, p_unsafe = c.sample(prot, safe), c.sample(prot, unsafe)
    again_safe, again_unsafe = c.sample(c.model, safe), c.sample(c.model, unsafe)
    p2_unsafe = c.sample(prot, unsafe)
    return {
        "safe_vs_base": maxdiff(p_safe, base_safe), "unsafe_vs_base": maxdiff(p_unsafe, base_unsafe),
        "original_after_safe": maxdiff(again_safe, base_safe), "original_after_unsafe": maxdiff(again_unsafe, base_unsafe),
        "protected_repeat": maxdiff(p2_unsafe, p_unsafe), "original_state_unchanged": _state(c.model) == before,
        "clone_is_new": prot is not c.model, "base_unsafe_scale": float(base_unsafe.abs().max()),
    }


@scenario
def strength_zero(c: Context) -> dict:
    unsafe = c.cond(True, seed=3)
    base = c.sample(c.model, unsafe)
    return {"strength0_vs_base": maxdiff(c.sample(c.apply(c.model, "main.safetensors", strength=0.0), unsafe), base),
            "strength1_vs_base": maxdiff(c.sample(c.apply(c.model, "main.safetensors", strength=1.0), unsafe), base),
            "threshold_099_vs_base": maxdiff(c.sample(c.apply(c.model, "main.safetensors", threshold=0.999), unsafe), base)}


@scenario
def chain(c: Context) -> dict:
    """Two Apply nodes = both adapters in order."""
    unsafe = c.cond(True, seed=5)
    union = c.sample(c.apply(c.model, "main.safetensors"), unsafe)
    chained = c.sample(c.apply(c.apply(c.model, "double_only.safetensors"), "single_only.safetensors"), unsafe)
    one = c.sample(c.apply(c.model, "double_only.safetensors"), unsafe)
    # "second" rotates in another plane through the concept direction; after "main" its scores are
    # lower, so it runs with threshold SECOND_TAU to act in either order
    ab = c.sample(c.apply(c.apply(c.model, "main.safetensors"), "second.safetensors", threshold=SECOND_TAU), unsafe)
    ba = c.sample(c.apply(c.apply(c.model, "second.safetensors", threshold=SECOND_TAU), "main.safetensors"), unsafe)
    return {"disjoint_chain_vs_union": maxdiff(chained, union), "one_vs_union": maxdiff(one, union),
            "order_ab_vs_ba": maxdiff(ab, ba), "ab_vs_main": maxdiff(ab, union)}


@scenario
def sampling_range(c: Context) -> dict:
    unsafe = c.cond(True, seed=6)
    base = c.sample(c.model, unsafe, steps=4)
    full = c.sample(c.apply(c.model, "main.safetensors"), unsafe, steps=4)
    never = c.sample(c.apply(c.model, "main.safetensors", start=1.0, end=1.0), unsafe, steps=4)
    late = c.sample(c.apply(c.model, "main.safetensors", start=0.5, end=1.0), unsafe, steps=4)
    bad = error_of(lambda: c.apply(c.model, "main.safetensors", start=0.8, end=0.2))
    return {"never_vs_base": maxdiff(never, base), "late_vs_base": maxdiff(late, base), "late_vs_full": maxdiff(late, full),
            "start_after_end": bad}


@scenario
def parity(c: Context) -> dict:
    """The same weights and adapters in diffusers (engine integration) and ComfyUI (this pack)."""
    import comfy.patcher_extension
    from driver_assets import diffusers_call

    dif = __import__(c.engine.__name__ + ".diffusers", fromlist=["x"])
    unsafe = c.cond(True, seed=8)
    out = {}
    for name, adapters in (("base", []), ("main", [("main.safetensors", None)]),
                           ("stack", [("main.safetensors", None), ("second.safetensors", SECOND_TAU)])):
        m = c.model
        for a, tau in adapters:
            m = c.apply(m, a, threshold=-1.0 if tau is None else tau)
        m = m.clone()
        seen: list = []

        def capture(executor, *args, **kwargs):
            res = executor(*args, **kwargs)
            if not seen:
                seen.append((args[0].clone(), args[1].clone(), args[2].clone(), args[3].clone(), args[4].clone(), res.clone()))
            return res

        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_capture", capture)
        c.sample(m, unsafe, steps=2, cfg=1.0)
        x, sigma, ctx, y, guidance, comfy_out = seen[0]
        handles = [dif.apply_saferope(c.assets.diffusers, c.adapter(a), threshold=tau) for a, tau in adapters]
        try:
            dif_out = diffusers_call(c.assets.diffusers, x, sigma, ctx, y, guidance)
        finally:
            for h in reversed(handles):
                h.remove()
        out[name] = {"comfy": comfy_out, "diffusers": dif_out}
    res = {}
    for name in ("base", "main", "stack"):
        a, b = out[name]["comfy"], out[name]["diffusers"]
        res[name] = {"max_abs": maxdiff(a, b), "scale": float(b.abs().max())}
    res["stack_vs_main"] = maxdiff(out["stack"]["comfy"], out["main"]["comfy"])
    for name in ("main", "stack"):
        dc = out[name]["comfy"] - out["base"]["comfy"]
        dd = out[name]["diffusers"] - out["base"]["diffusers"]
        res[name]["delta_rel"] = float((dc - dd).norm() / dd.norm().clamp_min(1e-30))
        res[name]["delta_norm"] = float(dd.norm())
    return res


@scenario
def fail_closed(c: Context) -> dict:
    import comfy.patcher_extension

    unsafe = c.cond(True, seed=9)
    res = {"incompatible": error_of(lambda: c.apply(c.model, "wrong_heads.safetensors"))}
    prot = c.apply(c.model, "main.safetensors")
    broken = prot.clone()
    layer = c.pack.nodes.install.layers_of(broken)[0]
    if layer.mode == "attn1":
        patches = broken.model_options["transformer_options"]["patches"]
        patches["attn1_patch"] = [p for p in patches["attn1_patch"] if not isinstance(p, c.pack.nodes.patch.Attn1Patch)]
    else:
        for key in [k for k, v in broken.object_patches.items() if isinstance(v, c.pack.nodes.patch.NormPatch)]:
            del broken.object_patches[key]
    res["mode"] = layer.mode
    res["hook_disabled"] = error_of(lambda: c.sample(broken, unsafe))
    res["hook_disabled_safe_prompt"] = error_of(lambda: c.sample(broken, c.cond(False)))
    # a block replaced by another node (a "cache" that skips the real block)
    skip = prot.clone()

    def skip_block(args, extra):
        return {"img": args["img"], "txt": args["txt"]}

    skip.set_model_patch_replace(skip_block, "dit", "double_block", 0)
    res["block_skipped"] = error_of(lambda: c.sample(skip, unsafe))
    # the protected clone still works afterwards, and the original is untouched
    res["after_ok"] = error_of(lambda: c.sample(prot, unsafe))
    wrapper_type = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    res["original_has_no_saferope"] = not c.pack.nodes.install.layers_of(c.model) and \
        "saferope" not in c.model.wrappers.get(wrapper_type, {})
    return res


@scenario
def object_mode(c: Context) -> dict:
    """The default hook (QK-norm object patches) and attn1_patch (only where the blocks call it) agree."""
    install = c.pack.nodes.install
    unsafe, safe = c.cond(True, seed=10), c.cond(False, seed=10)
    base_u, base_s = c.sample(c.model, unsafe), c.sample(c.model, safe)
    a = c.adapter("main.safetensors")
    auto = c.apply(c.model, a)
    res = {"auto_mode": install.layers_of(auto)[0].mode, "object_patches": len(auto.object_patches),
           "auto_unsafe_vs_base": maxdiff(c.sample(auto, unsafe), base_u),
           "auto_safe_vs_base": maxdiff(c.sample(auto, safe), base_s)}
    res["attn1_forced"] = error_of(lambda: install.apply_saferope(c.model, a, mode="attn1"))
    if res["attn1_forced"]["raised"] is None:
        attn1 = install.apply_saferope(c.model, a, mode="attn1")
        res["attn1_vs_auto"] = maxdiff(c.sample(attn1, unsafe), c.sample(auto, unsafe))
        res["attn1_safe_vs_base"] = maxdiff(c.sample(attn1, safe), base_s)
    return res


@scenario
def dtypes(c: Context) -> dict:
    res = {}
    unsafe, safe = c.cond(True, seed=11), c.cond(False, seed=11)
    for name, dt in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float8_e4m3fn", torch.float8_e4m3fn),
                     ("float8_e5m2", torch.float8_e5m2)):
        try:
            m, how = c.tinyflux.load_tiny_flux(c.assets.comfy_sd, dt)
            p = c.apply(m, "main.safetensors")
            bu, bs = c.sample(m, unsafe, steps=2), c.sample(m, safe, steps=2)
            pu, ps = c.sample(p, unsafe, steps=2), c.sample(p, safe, steps=2)
            p0 = c.sample(c.apply(m, "main.safetensors", strength=0.0), unsafe, steps=2)
            res[name] = {"weight_dtype": str(next(m.model.diffusion_model.parameters()).dtype), "load": how,
                         "unsafe_vs_base": maxdiff(pu, bu), "safe_vs_base": maxdiff(ps, bs),
                         "strength0_vs_base": maxdiff(p0, bu), "finite": bool(torch.isfinite(pu).all())}
        except Exception as e:  # noqa: BLE001
            res[name] = {"error": f"{type(e).__name__}: {e}"}
    return res


@scenario
def neighbours(c: Context) -> dict:
    """Next to a LoRA-style weight patch and to other attn1_patch / object-patch users."""
    unsafe, safe = c.cond(True, seed=12), c.cond(False, seed=12)
    lora = c.model.clone()
    key = "diffusion_model.double_blocks.0.img_attn.proj.weight"
    w = lora.get_model_object(key)
    lora.add_patches({key: (torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.05,)}, 1.0)
    l_s, l_u = c.sample(lora, safe), c.sample(lora, unsafe)
    lp = c.apply(lora, "main.safetensors")
    res = {"lora_changes_base": maxdiff(l_u, c.sample(c.model, unsafe)),
           "lora_protected_safe_vs_lora": maxdiff(c.sample(lp, safe), l_s),
           "lora_protected_unsafe_vs_lora": maxdiff(c.sample(lp, unsafe), l_u),
           "lora_after": maxdiff(c.sample(lora, unsafe), l_u)}
    calls = {"before": 0, "after": 0, "norm": 0}

    def other(tag):
        def patch(q, k, v, pe=None, attn_mask=None, extra_options=None):
            calls[tag] += 1
            return {"v": v * 1.0}
        return patch

    if c.pack.nodes.compat.comfy_model(c.model).attn1_patch:  # other attn1_patch users, with either hook of ours
        for mode in (None, "attn1"):
            m = c.model.clone()
            m.set_model_attn1_patch(other("before"))
            m = c.pack.nodes.install.apply_saferope(m, c.adapter("main.safetensors"), mode=mode).clone()
            m.set_model_attn1_patch(other("after"))
            alone = c.pack.nodes.install.apply_saferope(c.model, c.adapter("main.safetensors"), mode=mode)
            res[f"attn1_neighbours_vs_alone[{mode or 'object'}]"] = maxdiff(c.sample(m, unsafe), c.sample(alone, unsafe))
    m = c.model.clone()
    nkey = "diffusion_model.single_blocks.0.norm.forward"
    norm = m.get_model_object("diffusion_model.single_blocks.0.norm")

    def foreign(q, k, v):
        calls["norm"] += 1
        return type(norm).forward(norm, q, k, v)

    m.add_object_patch(nkey, foreign)
    obj = c.pack.nodes.install.apply_saferope(m, c.adapter("main.safetensors"), mode="object")
    res["object_neighbour_vs_object_alone"] = maxdiff(
        c.sample(obj, unsafe),
        c.sample(c.pack.nodes.install.apply_saferope(c.model, c.adapter("main.safetensors"), mode="object"), unsafe))
    res["calls"] = dict(calls)
    return res


@scenario
def shapes(c: Context) -> dict:
    """Prompts of different lengths in one sampling, odd resolutions, Kontext reference tokens."""
    p = c.apply(c.model, "main.safetensors")
    res = {}
    pos_s, neg_s = c.cond(False, seed=13, length=5), c.cond(False, seed=14, length=29)
    res["lengths_safe_vs_base"] = maxdiff(c.sample(p, pos_s, neg_s), c.sample(c.model, pos_s, neg_s))
    pos_u = c.cond(True, seed=13, length=5)
    res["lengths_unsafe_vs_base"] = maxdiff(c.sample(p, pos_u, neg_s), c.sample(c.model, pos_u, neg_s))
    neg_u = c.cond(True, seed=15, length=21)
    res["unsafe_negative_only_vs_base"] = maxdiff(c.sample(p, pos_s, neg_u), c.sample(c.model, pos_s, neg_u))
    res["odd_size_unsafe_vs_base"] = maxdiff(c.sample(p, pos_u, width=88, height=40),
                                             c.sample(c.model, pos_u, width=88, height=40))
    res["odd_size_safe_vs_base"] = maxdiff(c.sample(p, pos_s, width=88, height=40), c.sample(c.model, pos_s, width=88, height=40))
    ref = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(3))
    kon_u = c.cond(True, seed=16, reference_latents=[ref])
    kon_s = c.cond(False, seed=16, reference_latents=[ref])
    res["kontext_unsafe_vs_base"] = maxdiff(c.sample(p, kon_u), c.sample(c.model, kon_u))
    res["kontext_safe_vs_base"] = maxdiff(c.sample(p, kon_s), c.sample(c.model, kon_s))
    res["kontext_vs_plain"] = maxdiff(c.sample(c.model, kon_s), c.sample(c.model, c.cond(False, seed=16)))
    _, text = c.node("SafeRoPELRSVisualizer").visualize(p, kon_u, 64, 64, 0.0, 0)[:2]
    res["kontext_summary"] = text
    return res


@scenario
def visualizer(c: Context) -> dict:
    import comfy.utils
    from driver_assets import TRIGGERS

    p = c.apply(c.model, "main.safetensors")
    ticks: list = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview=None, *a, **k: ticks.append((value, total)))
    try:
        img_u, text_u = c.node("SafeRoPELRSVisualizer").visualize(p, c.cond(True, seed=17), 64, 48, 0.0, 0)[:2]
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    img_s, text_s = c.node("SafeRoPELRSVisualizer").visualize(p, c.cond(False, seed=17), 64, 48, 0.0, 0)[:2]
    chained = c.apply(p, "second.safetensors", start=0.5, end=1.0)
    _, text_c = c.node("SafeRoPELRSVisualizer").visualize(chained, c.cond(True, seed=17), 64, 64, 0.0, 0)[:2]
    from PIL import Image

    out = c.work / "visualizer_unsafe.png"
    Image.fromarray((img_u[0].numpy() * 255).round().astype("uint8")).save(out)
    Image.fromarray((img_s[0].numpy() * 255).round().astype("uint8")).save(c.work / "visualizer_safe.png")
    no_layers = error_of(lambda: c.node("SafeRoPELRSVisualizer").visualize(c.model, c.cond(True), 64, 64, 0.0, 0))
    outputs = {}  # the branchable outputs of the visualizer and of the Risk Check node, same evaluation
    for name, cond in (("unsafe", c.cond(True, seed=17)), ("safe", c.cond(False, seed=17))):
        _, _, vis_max, vis_flag = c.node("SafeRoPELRSVisualizer").visualize(p, cond, 64, 48, 0.0, 0)
        chk_max, chk_flag, _ = c.node("SafeRoPERiskCheck").check(p, cond, 64, 48, 0.0, 0)
        outputs[name] = {"visualizer": [vis_max, vis_flag], "risk_check": [chk_max, chk_flag],
                         "types": [type(vis_max).__name__, type(vis_flag).__name__]}
    # inactive at this noise level: the prompt still passes the threshold (flagged), nothing is rotated
    _, late_flag, _ = c.node("SafeRoPERiskCheck").check(c.apply(c.model, "main.safetensors", start=0.5, end=1.0),
                                                         c.cond(True, seed=17), 64, 48, 0.0, 0)
    outputs["inactive_flagged"] = late_flag
    outputs["risk_check_no_layers"] = error_of(lambda: c.node("SafeRoPERiskCheck").check(c.model, c.cond(True), 64, 64, 0.0, 0))
    return {"unsafe_summary": text_u, "safe_summary": text_s, "chained_summary": text_c, "triggers": TRIGGERS,
            "outputs": outputs,
            "image_shape": list(img_u.shape), "image_dtype": str(img_u.dtype),
            "image_range": [float(img_u.min()), float(img_u.max())], "progress": ticks,
            "png": str(out), "no_layers": no_layers}


#: ComfyUI's own FLUX.1-dev text-to-image template (package comfyui-workflow-templates*, pinned by the tree)
FLUX_TEMPLATE = "flux_dev_full_text_to_image.json"


def comfy_templates(name: str) -> list[Path]:
    """``name`` in the template packages installed beside this ComfyUI (the frontend's template browser)."""
    import importlib.util

    found = []
    for pkg in ("comfyui_workflow_templates_media_image", "comfyui_workflow_templates"):
        spec = importlib.util.find_spec(pkg)
        for loc in (spec.submodule_search_locations or []) if spec else []:
            if (Path(loc) / "templates" / name).is_file():
                found.append(Path(loc) / "templates" / name)
    return found


def _node_specs(types: set[str]) -> tuple[dict, dict]:
    """INPUT_TYPES and ``[(name, type)]`` outputs of those node types that this ComfyUI has."""
    import nodes

    specs, outputs = {}, {}
    for t in types:
        cls = nodes.NODE_CLASS_MAPPINGS.get(t)
        if cls is None:
            continue
        specs[t] = json.loads(json.dumps(cls.INPUT_TYPES(), default=str))
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        outputs[t] = [(str(n), str(ty)) for n, ty in zip(names, cls.RETURN_TYPES)]
    return specs, outputs


@scenario
def workflows(c: Context) -> dict:
    """The example workflows and ComfyUI's own FLUX template with our three nodes inserted, checked
    against every node definition of this ComfyUI, subgraphs included (tests/comfy/workflow_check.py)."""
    import nodes

    ours = {"SafeRoPEAdapterLoader", "SafeRoPEApply", "SafeRoPELRSVisualizer", "PreviewImage"}

    def check(wf: dict) -> dict:
        specs, _ = _node_specs({n["type"] for _, n in wc.all_nodes(wf)})
        requires = dict(wf.get("extra", {}).get("saferope", {}).get("requires", {}))  # newer core nodes it names
        return {**wc.check_nodes(wf, specs), "well_formed": wc.well_formed(wf), "requires": sorted(requires),
                "requires_absent": sorted(t for t in requires if t not in nodes.NODE_CLASS_MAPPINGS),
                "saferope_nodes": sorted({n["type"] for _, n in wc.all_nodes(wf) if n["type"].startswith("SafeRoPE")})}

    res: dict = {"examples": {}, "templates": {}}
    for path in sorted((Path(c.pack.__file__).parent / "example_workflows").glob("*.json")):
        res["examples"][path.name] = check(json.loads(path.read_text()))
    for path in comfy_templates(FLUX_TEMPLATE)[:1]:
        wf = json.loads(path.read_text())
        specs, outputs = _node_specs(ours | {n["type"] for _, n in wc.all_nodes(wf)})
        inserted, where = wc.insert_saferope(wf, specs, outputs, "main.safetensors")
        res["templates"][path.name] = {"source": str(path), "original": check(wf), "inserted": check(inserted),
                                       "inserted_in": where}
        (c.work / f"saferope_{path.name}").write_text(json.dumps(inserted, indent=1))
    return res
