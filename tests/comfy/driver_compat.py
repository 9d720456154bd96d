"""Compatibility scenarios run by comfy_driver.py: torch.compile, block caches, GGUF.

Registered in :data:`driver_scenarios.SCENARIOS` after the core scenarios, so they run last (the
third-party packs leave state on the models they touch: every scenario here loads its own model).
Third-party packs are used only through their own node classes and loader functions, looked up
in ComfyUI's ``NODE_CLASS_MAPPINGS`` / ``sys.modules`` (they are loaded by ComfyUI's custom-node
loader from ``custom_nodes``, see :mod:`trees`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from driver_scenarios import SCENARIOS, Context, error_of, maxdiff, scenario

__all__ = ["SCENARIOS"]


def rel(a: torch.Tensor | None, b: torch.Tensor) -> float | None:
    """``‖a − b‖ / ‖b‖`` (None when ``a`` is missing)."""
    if a is None:
        return None
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def attempt(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor | None, dict]:
    """Run ``fn``; returns ``(result, {"raised": ...})`` without letting an error end the scenario."""
    out: list = []
    err = error_of(lambda: out.append(fn()))
    return (out[0] if out else None), err


def node_output(result: Any) -> Any:
    """First output of a node call (V1 tuple or V3 ``NodeOutput``)."""
    return result[0] if isinstance(result, tuple) else result.result[0]


# -- torch.compile --------------------------------------------------------------------------------------
STEPS = 2  # each distinct graph costs an inductor compile on CPU: keep the model calls few


@scenario
def torch_compile(c: Context) -> dict:
    """Core TorchCompileModel (inductor) with SafeRoPE, in both orders of first use in one process.

    Each order starts from an empty dynamo cache (``torch._dynamo.reset()``) and a freshly loaded
    model, which is what a new ComfyUI process sees. Every compiled result is compared with the
    eager result of the same model and settings.
    """
    import nodes

    tc = nodes.NODE_CLASS_MAPPINGS["TorchCompileModel"]

    def compiled(m: Any) -> Any:
        return node_output(tc.execute(m, "inductor"))

    unsafe, safe = c.cond(True, seed=21), c.cond(False, seed=21)
    base = c.tinyflux.load_tiny_flux(c.assets.comfy_sd)[0]

    def prot(m: Any, **kw: Any) -> Any:
        return c.apply(m, "main.safetensors", **kw)

    def sample(m: Any, cond: list) -> torch.Tensor:
        return c.sample(m, cond, steps=STEPS)

    eager = {"plain": sample(base, unsafe), "plain_safe": sample(base, safe), "prot": sample(prot(base), unsafe),
             "prot_safe": sample(prot(base), safe), "strength_05": sample(prot(base, strength=0.5), unsafe),
             "threshold_0999": sample(prot(base, threshold=0.999), unsafe)}
    # (step name, reference, how the model is built from a freshly loaded one, prompt)
    steps: dict[str, list[tuple[str, str, Callable[[Any], Any], list]]] = {
        "plain_first": [
            ("plain", "plain", compiled, unsafe),
            ("apply_after_compile", "prot", lambda m: prot(compiled(m)), unsafe),
            ("apply_after_compile_safe", "prot_safe", lambda m: prot(compiled(m)), safe),
            ("compile_after_apply", "prot", lambda m: compiled(prot(m)), unsafe),
            ("strength_05", "strength_05", lambda m: prot(compiled(m), strength=0.5), unsafe),
            ("threshold_0999", "threshold_0999", lambda m: prot(compiled(m), threshold=0.999), unsafe),
            ("plain_again", "plain", compiled, unsafe),
        ],
        "protected_first": [
            ("compile_after_apply", "prot", lambda m: compiled(prot(m)), unsafe),
            ("strength_05", "strength_05", lambda m: compiled(prot(m, strength=0.5)), unsafe),
            ("threshold_0999", "threshold_0999", lambda m: compiled(prot(m, threshold=0.999)), unsafe),
            ("plain", "plain", compiled, unsafe),
            ("plain_safe", "plain_safe", compiled, safe),
            ("apply_after_compile", "prot", lambda m: prot(compiled(m)), unsafe),
        ],
    }
    res: dict = {"eager": {"prot_vs_plain": rel(eager["prot"], eager["plain"]),
                           "prot_safe_vs_plain_safe": maxdiff(eager["prot_safe"], eager["plain_safe"]),
                           "strength_05_vs_prot": rel(eager["strength_05"], eager["prot"]),
                           "threshold_0999_vs_plain": maxdiff(eager["threshold_0999"], eager["plain"])}}

    for order, plan in steps.items():
        torch._dynamo.reset()
        model = c.tinyflux.load_tiny_flux(c.assets.comfy_sd)[0]
        res[order] = {}
        for name, ref, build, cond in plan:
            t = time.time()
            out, err = attempt(lambda: sample(build(model), cond))
            res[order][name] = {"rel_vs_eager": rel(out, eager[ref]), "reference": ref, "error": err,
                                "rel_vs_eager_plain": rel(out, eager["plain" if cond is unsafe else "plain_safe"]),
                                "seconds": round(time.time() - t, 1)}
    if c.pack.nodes.compat.comfy_model(base).attn1_patch:  # the attn1 hook refuses torch.compile up front
        a = c.adapter("main.safetensors")
        forced = compiled(c.pack.nodes.install.apply_saferope(base, a, mode="attn1"))
        res["attn1_compiled"] = error_of(lambda: sample(forced, unsafe))
    torch._dynamo.reset()
    return res


# -- block caches (TeaCache, WaveSpeed First Block Cache) -----------------------------------------------
CACHE_STEPS = 4
#: node id, and a function (node, model, threshold, start, end) -> patched model, per cache pack
CACHES: dict[str, tuple[str, Callable[..., Any]]] = {
    "teacache": ("TeaCache", lambda node, m, thresh, start, end: node.apply_teacache(m, "flux", thresh, start, end, "cpu")[0]),
    "fbcache": ("ApplyFBCacheOnModel",
                lambda node, m, thresh, start, end: node.patch(m, "diffusion_model", thresh, -1, start, end)[0]),
}
AGGRESSIVE = {"teacache": 10.0, "fbcache": 1.0}  # the packs' maximum thresholds: reuse whenever they may
NEVER = 1e-9  # a threshold no step falls below: every block runs on every step


@scenario
def block_caches(c: Context) -> dict:
    """SafeRoPE next to the block caches: refused (naming the cache) when blocks are skipped while active,
    protected when the cache runs every block, or when the two act on disjoint parts of sampling."""
    import nodes

    unsafe, safe = c.cond(True, seed=23), c.cond(False, seed=23)
    res: dict = {}
    for key, (node_id, make) in CACHES.items():
        cls = nodes.NODE_CLASS_MAPPINGS.get(node_id)
        if cls is None:
            res[key] = {"node": node_id, "loaded": False}
            continue
        node = cls()
        m = c.tinyflux.load_tiny_flux(c.assets.comfy_sd)[0]  # the packs leave state on the diffusion model

        def cache(model: Any, thresh: float, start: float = 0.0, end: float = 1.0) -> Any:
            return make(node, model, thresh, start, end)

        def sample(model: Any, cond: list) -> torch.Tensor:
            return c.sample(model, cond, steps=CACHE_STEPS)

        r: dict = {"node": node_id, "loaded": True}
        plain = sample(m, unsafe)
        alone, r["alone"] = attempt(lambda: sample(cache(m, AGGRESSIVE[key]), unsafe))
        r["alone_vs_plain"] = None if alone is None else maxdiff(alone, plain)  # > 0: it did reuse something
        r["cache_after_apply"] = error_of(lambda: sample(cache(c.apply(m, "main.safetensors"), AGGRESSIVE[key]), unsafe))
        r["apply_after_cache"] = error_of(lambda: sample(c.apply(cache(m, AGGRESSIVE[key]), "main.safetensors"), unsafe))
        r["safe_prompt"] = error_of(lambda: sample(cache(c.apply(m, "main.safetensors"), AGGRESSIVE[key]), safe))
        # a cache that runs every block: accepted, and protection applies
        full_u, r["full_plain"] = attempt(lambda: sample(cache(m, NEVER), unsafe))
        full_s = sample(cache(m, NEVER), safe) if full_u is not None else None
        prot_u, r["full_protected"] = attempt(lambda: sample(cache(c.apply(m, "main.safetensors"), NEVER), unsafe))
        prot_s, r["full_protected_safe"] = attempt(lambda: sample(cache(c.apply(m, "main.safetensors"), NEVER), safe))
        if full_u is not None and prot_u is not None and prot_s is not None:
            r["full_unsafe_vs_cache"] = maxdiff(prot_u, full_u)
            r["full_safe_vs_cache"] = maxdiff(prot_s, full_s)
            r["full_cache_vs_plain"] = rel(full_u, plain)
        # the cache acts only in the second half, SafeRoPE only in the first quarter
        late_cache = cache(m, AGGRESSIVE[key], 0.5, 1.0)
        late, r["late_cache_alone"] = attempt(lambda: sample(late_cache, unsafe))
        early, r["disjoint"] = attempt(lambda: sample(c.apply(late_cache, "main.safetensors", start=0.0, end=0.25), unsafe))
        if late is not None and early is not None:
            r["late_cache_vs_plain"] = maxdiff(late, plain)  # > 0: it reused something in the second half
            r["disjoint_vs_cache_alone"] = maxdiff(early, late)
        res[key] = r
    return res


# -- GGUF (city96/ComfyUI-GGUF) -------------------------------------------------------------------------
GGUF_TYPES = ("F16", "Q8_0")


def write_gguf(sd: dict, path: Any, qtype: str) -> dict:
    """The tiny FLUX's ComfyUI-layout weights as a GGUF file (architecture ``flux``), written with the
    ``gguf`` package: matrices in ``qtype`` where their rows fit its blocks, everything else float32.
    Returns the count of tensors per stored type."""
    import gguf
    import numpy as np

    kind = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[kind][0]  # values per quantization block (1 for F16)
    writer = gguf.GGUFWriter(str(path), "flux")
    counts: dict = {}
    for name, t in sorted(sd.items()):
        data = t.detach().float().contiguous().numpy()
        stored = kind if data.ndim >= 2 and data.shape[-1] % block == 0 else gguf.GGMLQuantizationType.F32
        if stored == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        elif stored == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, stored), raw_dtype=stored)
        counts[stored.name] = counts.get(stored.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


@scenario
def gguf(c: Context) -> dict:
    """Tiny FLUX from F16 and Q8_0 GGUF files through ComfyUI-GGUF, protected by SafeRoPE.

    Where ComfyUI's own loader builds the tiny model (0.9+), the pack's ``UnetLoaderGGUF`` node
    loads it; before that (FLUX.1's head count is hard-coded there) the pack's loader functions do
    what the node does — ``gguf_sd_loader`` + ``GGMLOps`` + ``GGUFModelPatcher`` — on a model built
    from the detected config.
    """
    import folder_paths

    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS.get("UnetLoaderGGUF")
    if cls is None:
        return {"loaded": False}
    pack = sys.modules[cls.__module__]  # the pack's nodes.py: it imports its loader and ops
    folder = folder_paths.get_folder_paths("diffusion_models")[0]
    unsafe, safe = c.cond(True, seed=25), c.cond(False, seed=25)
    base32 = c.sample(c.model, unsafe, steps=2)
    res: dict = {"loaded": True, "node": c.load_how == "loader"}
    for qtype in GGUF_TYPES:
        name = f"tinyflux-{qtype}.gguf"
        path = __import__("pathlib").Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        r: dict = {"written": write_gguf(c.assets.comfy_sd, path, qtype)}
        if res["node"]:
            m = cls().load_unet(name)[0]
        else:
            sd = pack.gguf_sd_loader(str(path))
            m = pack.GGUFModelPatcher.clone(c.tinyflux.load_tiny_flux(sd, custom_operations=pack.GGMLOps())[0])
        params = list(m.model.diffusion_model.parameters())
        r["patcher"] = type(m).__name__
        r["param_types"] = sorted({getattr(getattr(p, "tensor_type", None), "name", str(p.dtype)) for p in params})
        bu, bs = c.sample(m, unsafe, steps=2), c.sample(m, safe, steps=2)
        p = c.apply(m, "main.safetensors")
        pu, ps = c.sample(p, unsafe, steps=2), c.sample(p, safe, steps=2)
        r.update(base_vs_float32=rel(bu, base32), unsafe_vs_base=maxdiff(pu, bu), safe_vs_base=maxdiff(ps, bs),
                 strength0_vs_base=maxdiff(c.sample(c.apply(m, "main.safetensors", strength=0.0), unsafe, steps=2), bu),
                 protected_vs_float32_protected=rel(pu, c.sample(c.apply(c.model, "main.safetensors"), unsafe, steps=2)),
                 finite=bool(torch.isfinite(pu).all()))
        res[qtype] = r
    return res
