"""SafeRoPE next to what FLUX users combine it with, in a real ComfyUI: torch.compile, block caches, GGUF.

Which tests exist depends on the tree (``trees.py``, read at collection time): the block caches
TeaCache and First Block Cache are tested where they work by themselves (ComfyUI 0.3.x); on newer
trees the generated test asserts the pack's own failure instead, so no test is skipped or passes
without having checked something. The packs come from ``SAFEROPE_NODEPACKS`` (see ``trees.py``).
"""

from __future__ import annotations

import pytest
import trees

pytestmark = pytest.mark.comfyui
VERSION = trees.current_version()
TOL = 1e-4  # compiled vs eager, relative


# -- torch.compile (core TorchCompileModel, inductor) -----------------------------------------------------
COMPILE_STEPS = {
    "plain_first": ["plain", "apply_after_compile", "apply_after_compile_safe", "compile_after_apply", "strength_05",
                    "threshold_0999", "plain_again"],
    "protected_first": ["compile_after_apply", "strength_05", "threshold_0999", "plain", "plain_safe",
                        "apply_after_compile"],
}


@pytest.mark.parametrize("order,step", [(o, s) for o, steps in COMPILE_STEPS.items() for s in steps])
def test_torch_compile_equals_eager_in_every_order(driver, scenario, order, step):
    """Every compiled sampling equals the eager one of the same model and settings (the plain model's
    too: not silently protected by a graph traced for a protected clone, nor the other way round)."""
    r = scenario("torch_compile")[order][step]
    assert r["error"]["raised"] is None, r["error"]
    assert r["rel_vs_eager"] <= TOL, r


def test_torch_compile_results_are_not_all_the_same(driver, scenario):
    """The references differ where the settings differ, so the comparisons above can fail."""
    r = scenario("torch_compile")
    e = r["eager"]
    assert e["prot_vs_plain"] > 100 * TOL and e["strength_05_vs_prot"] > 100 * TOL
    assert e["prot_safe_vs_plain_safe"] == 0.0 and e["threshold_0999_vs_plain"] == 0.0
    for order in COMPILE_STEPS:
        assert r[order]["apply_after_compile"]["rel_vs_eager_plain"] > 100 * TOL  # protected, not plain
        assert r[order]["threshold_0999"]["rel_vs_eager_plain"] <= TOL  # a new threshold took effect


def test_the_attn1_hook_refuses_torch_compile_with_the_remedy(driver, scenario):
    r = scenario("torch_compile")
    if driver["info"]["attn1"]:
        e = r["attn1_compiled"]
        assert e["raised"] == "SafeRoPEError" and "TorchCompileModel" in e["message"]
        assert "mode='attn1'" in e["message"] and "Apply SafeRoPE with the default hook" in e["message"]
    else:  # no attn1_patch in this ComfyUI's blocks: the mode cannot even be chosen
        assert "attn1_compiled" not in r and scenario("object_mode")["attn1_forced"]["raised"] == "SafeRoPEError"


# -- block caches -----------------------------------------------------------------------------------------
def _sites(*blocks: str) -> list[str]:
    """Object-patch site names of ComfyUI's Flux blocks ("double.0" -> both stream norms), sorted."""
    out = []
    for b in blocks:
        out += [f"{b}:img_attn.norm", f"{b}:txt_attn.norm"] if b.startswith("double") else [f"{b}:norm"]
    return sorted(out)


CACHES = {"teacache": ("teacache_flux_forward", _sites("double.0", "double.1", "single.0", "single.1")),
          "fbcache": ("create_patch_flux_forward_orig.<locals>.forward_orig",
                      _sites("double.1", "single.0", "single.1"))}  # its first block runs
WORKING = [k for k in CACHES if trees.PACKS[k].works_on(VERSION)]
BROKEN = [k for k in CACHES if not trees.PACKS[k].works_on(VERSION)]


def _cache(driver, scenario, key):
    pack = trees.PACKS[key]
    boot = driver["boot"]["third_party"][key]
    assert boot["present"], f"{pack.folder} is not in {driver['boot']['nodepacks']} (set SAFEROPE_NODEPACKS)"
    return scenario("block_caches")[key], boot


# Generated only where they apply (an empty parametrisation would be a skip, and CI fails on skips).
if WORKING:
    @pytest.mark.parametrize("key", WORKING)
    @pytest.mark.parametrize("case", ["cache_after_apply", "apply_after_cache", "safe_prompt"])
    def test_a_block_cache_that_skips_blocks_is_refused_naming_it(driver, scenario, key, case):
        r, boot = _cache(driver, scenario, key)
        assert boot["loaded"] and r["loaded"]
        assert r["alone"]["raised"] is None and r["alone_vs_plain"] > 0.0  # by itself it works, and reuses results
        e = r[case]
        func, missing = CACHES[key]
        assert e["raised"] == "HookNotRunError", e
        assert f"did not run for {missing}" in e["message"]
        assert f"forward_orig is replaced during this call by {func} from custom node pack " \
               f"'{trees.PACKS[key].folder}'" in e["message"]
        assert "Remedy: remove or bypass that node" in e["message"] and "Refusing to return" in e["message"]

    @pytest.mark.parametrize("key", WORKING)
    def test_a_block_cache_that_runs_every_block_is_protected(driver, scenario, key):
        r, _ = _cache(driver, scenario, key)
        for run in ("full_plain", "full_protected", "full_protected_safe"):
            assert r[run]["raised"] is None, (run, r[run])
        assert r["full_cache_vs_plain"] <= TOL  # with a threshold nothing falls below, it reuses nothing
        assert r["full_unsafe_vs_cache"] > 0.0 and r["full_safe_vs_cache"] == 0.0

    @pytest.mark.parametrize("key", WORKING)
    def test_a_block_cache_outside_saferope_range_is_accepted(driver, scenario, key):
        r, _ = _cache(driver, scenario, key)
        assert r["late_cache_alone"]["raised"] is None and r["late_cache_vs_plain"] > 0.0  # it reused blocks late
        assert r["disjoint"]["raised"] is None, r["disjoint"]
        assert r["disjoint_vs_cache_alone"] > 0.0  # SafeRoPE acted in the early steps


if BROKEN:
    @pytest.mark.parametrize("key", BROKEN)
    def test_a_block_cache_that_fails_on_this_comfyui_by_itself_returns_nothing(driver, scenario, key):
        """The pack's own failure on this tree (README: not usable here), with or without SafeRoPE."""
        r, boot = _cache(driver, scenario, key)
        if trees.PACKS[key].broken_how == "import":
            assert not boot["loaded"] and r["loaded"] is False
        else:
            assert boot["loaded"] and r["alone"]["raised"] is not None and "forward_orig" in r["alone"]["message"]
            assert all(r[case]["raised"] is not None for case in ("cache_after_apply", "apply_after_cache", "full_protected"))


# -- GGUF -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
def test_gguf_model_is_protected(driver, scenario, qtype):
    boot = driver["boot"]["third_party"]["gguf"]
    assert boot["present"], f"ComfyUI-GGUF is not in {driver['boot']['nodepacks']} (set SAFEROPE_NODEPACKS)"
    assert boot["loaded"], "ComfyUI-GGUF did not import: install `gguf` into the ComfyUI environment"
    g = scenario("gguf")
    assert g["node"] == (driver["info"]["load_how"] == "loader")  # the UnetLoaderGGUF node wherever it can load it
    r = g[qtype]
    assert r["written"][qtype] > 0 and r["patcher"] == "GGUFModelPatcher" and qtype in r["param_types"]
    assert r["base_vs_float32"] <= (1e-3 if qtype == "F16" else 1e-2)  # the file holds the tiny FLUX's weights
    assert r["finite"] and r["unsafe_vs_base"] > 0.0
    assert r["safe_vs_base"] == 0.0 and r["strength0_vs_base"] == 0.0
    assert r["protected_vs_float32_protected"] <= (1e-3 if qtype == "F16" else 1e-2)
