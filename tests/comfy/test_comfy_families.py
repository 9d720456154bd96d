"""Every model family SafeRoPE supports, as a tiny random model in a real ComfyUI (issue #10).

``family_driver.py`` runs once per ComfyUI tree (module fixture) in a child process: it builds
each family's tiny model through ComfyUI's own config and model classes, builds a concept adapter
from that model's own queries/keys, and runs the scenarios of ``family_scenarios.py`` through the
pack as ComfyUI loaded it. The tests below assert on what it recorded.

Which tests exist is decided at collection time from the tree's source (``family_table``, no
ComfyUI import here): families whose classes the tree lacks (Flux.2 and Z-Image in 0.3.64) get
no tests, and the ``attn1`` hook mode is generated only where the family's block classes call
``attn1_patch`` in that tree — so with ``SAFEROPE_COMFY_NO_SKIP=1`` nothing is skipped and no
test passes for lack of something to check. Without ``COMFYUI_PATH`` every test skips.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import family_table
import pytest
from comfy_env import HERE, comfy_python
from family_models import TINIES

pytestmark = pytest.mark.comfyui


def _tree() -> Path | None:
    path = os.environ.get("COMFYUI_PATH")
    if path and (Path(path) / "comfy" / "model_patcher.py").is_file():
        return Path(path).resolve()
    return None


TREE = _tree()
FAMILIES = family_table.families_in(TREE) if TREE else [f.family for f in family_table.FAMILIES]
#: every supported case: one per family, plus Z-Image with grouped-query keys where Z-Image exists
CASES = [c for c, t in TINIES.items() if t.family in FAMILIES]
UNSUPPORTED = family_table.unsupported_in(TREE) if TREE else [u[0] for u in family_table.UNSUPPORTED]
REASONS = {u[0]: u[3] for u in family_table.UNSUPPORTED}


def _modes(case: str) -> tuple[str, ...]:
    attn1 = TREE is not None and family_table.calls_attn1(TREE, TINIES[case].family)
    return ("attn1", "object") if attn1 else ("object",)


MODES = [(case, mode) for case in CASES for mode in _modes(case)]
NO_ATTN1 = [case for case in CASES if "attn1" not in _modes(case)]
#: where ComfyUI's key maps convert the weights to a diffusers model
PARITY = [c for c in CASES if c in ("flux1", "qwen_image", "z_image")]
#: where they do not, and why (what the driver must have found when it tried)
NO_PARITY = {"flux2": "comfy.utils.flux_to_diffusers leaves", "chroma": "comfy.utils.flux_to_diffusers leaves",
             "hunyuan_image": "no ComfyUI key map converts", "z_image_gqa": "no diffusers model has these weights"}
NO_PARITY_CASES = [c for c in CASES if c not in PARITY]
assert set(NO_PARITY_CASES) <= set(NO_PARITY), "a case without parity needs its reason here"


def only_if(values: list) -> Callable[[Callable], Callable | None]:
    """Define the decorated test only when it has cases in this tree: an empty parameter list would be a
    skip, and a skip fails CI (``SAFEROPE_COMFY_NO_SKIP=1``) although nothing is missing."""
    def define(test: Callable) -> Callable | None:
        return test if values else None
    return define


@pytest.fixture(scope="module")
def families(comfyui_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Runs family_driver.py once against this ComfyUI tree; returns what it recorded."""
    work = tmp_path_factory.mktemp("comfy_families")
    out = work / "families.json"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [comfy_python(), str(HERE / "family_driver.py"), "--comfyui", str(comfyui_path), "--work", str(work),
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=str(work), capture_output=True, text=True, timeout=1200, env=env)
    if proc.returncode != 0 or not out.is_file():
        pytest.fail(f"the ComfyUI family driver failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def result(families: dict, case: str, name: str) -> dict:
    """One scenario's record for one case; fails with the driver's traceback if the case or scenario raised."""
    c = families["cases"].get(case)
    assert c is not None, f"the driver ran no {case!r} case on ComfyUI {families['version']}"
    for key in ("setup", name):
        r = c.get(key)
        assert r is not None, f"{case}: scenario {key!r} did not run"
        if "error" in r:
            pytest.fail(f"{case} {key} raised in ComfyUI {families['version']}: {r['error']}\n{r.get('traceback', '')}")
    return c[name]


def _text_kinds(setup: dict) -> list[str]:
    return setup["calibration"]["candidates"]


# -- the tree and the models ---------------------------------------------------------------------
def test_the_driver_saw_the_families_collection_expected(families, comfyui_path):
    assert families["version"] == family_table.version(comfyui_path)
    assert families["families"] == FAMILIES and families["unsupported"] == UNSUPPORTED
    assert sorted(families["cases"]) == sorted(CASES + UNSUPPORTED)


@pytest.mark.parametrize("case", CASES)
def test_family_is_recognised_from_the_model_and_its_shapes_read_from_its_modules(families, case):
    s = result(families, case, "setup")
    tiny = TINIES[case]
    heads, kv = tiny.heads
    assert s["detected"] == tiny.family and s["config_class"] == tiny.config_class
    assert (s["num_heads"], s["head_dim"], s["num_kv_heads"]) == (heads, 128, kv)
    assert all(n > 0 for n in s["blocks"].values()), s["blocks"]


@pytest.mark.parametrize("case", CASES)
def test_attn1_detection_matches_what_this_comfyui_calls(families, case, comfyui_path):
    """The pack's detection, the tree's source and a counting attn1_patch agree, block by block."""
    r = result(families, case, "hooks")
    setup = result(families, case, "setup")
    assert r["detected"] == ("attn1" in _modes(case))
    if r["detected"]:
        assert set(r["calls"]) == set(r["expected_blocks"])
        for block_type, n in r["expected_blocks"].items():
            calls = r["calls"][block_type]
            assert sorted(i for i, _, _ in calls) == list(range(n))
            kind = next(k for k, (txt_len, _) in r["layout"].items() if txt_len)  # text length of this call
            for _, img_slice, L in calls:
                assert img_slice == [r["layout"][kind][0], L]  # text first, then image
    else:
        assert r["calls"] == {}
    fam = family_table.BY_ID[TINIES[case].family]
    for name, path in setup["hook_files"].items():  # the file the collection-time scan read is the one in use
        assert name in fam.hook_classes and Path(path) == family_table.hook_class_file(comfyui_path, fam, name)


# -- gating ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_outputs_change_only_for_concept_prompts(families, case):
    r = result(families, case, "protect")
    assert r["mode"] == "object"  # the default hook on every ComfyUI and family (attn1 is tested on request)
    assert r["safe_vs_base"] == 0.0  # bit-identical
    assert r["unsafe_vs_base"] > 1e-3 * r["base_scale"] and r["finite"]
    assert r["repeat"] == 0.0


@pytest.mark.parametrize("case", CASES)
def test_the_input_model_is_left_untouched(families, case):
    r = result(families, case, "protect")
    assert r["clone_is_new"] and r["original_state_unchanged"] and r["weights_unchanged"]
    assert r["original_has_no_saferope"]
    assert r["original_after_safe"] == 0.0 and r["original_after_unsafe"] == 0.0


@pytest.mark.parametrize("case,mode", MODES)
def test_every_hook_mode_gates_and_strength_zero_equals_base(families, case, mode):
    modes = result(families, case, "modes")
    r = modes[mode]
    assert r["layer_mode"] == mode
    assert r["safe_vs_base"] == 0.0 and r["unsafe_vs_base"] > 0.0
    assert r["strength0_vs_base"] == 0.0
    if mode == "attn1":  # both mechanisms reach the same vectors
        assert modes["object_vs_attn1"] <= 1e-5 * modes["scale"]


@only_if(NO_ATTN1)
@pytest.mark.parametrize("case", NO_ATTN1)
def test_forcing_attn1_where_the_blocks_do_not_call_it_is_refused(families, case):
    e = result(families, case, "modes")["attn1_forced"]
    assert e["raised"] == "SafeRoPEError" and "do not call attn1_patch" in e["message"]


@pytest.mark.parametrize("case", CASES)
def test_start_end_percent_limit_the_sampling_range(families, case):
    r = result(families, case, "sampling_range")
    assert r["full_vs_base"] > 0.0 and r["never_vs_base"] == 0.0
    assert r["late_vs_base"] > 0.0 and r["late_vs_full"] > 0.0
    assert r["start_after_end"]["raised"] == "ValueError"


# -- the token split and the LRS Visualizer ------------------------------------------------------------
@pytest.mark.parametrize("case,mode", MODES)
def test_every_hook_site_scores_exactly_the_text_tokens(families, case, mode):
    """The risk the pack reports per block equals the risk of the text tokens where the model put them
    (observed independently of the registry): the text/image split of every kind is right."""
    setup = result(families, case, "setup")
    r = result(families, case, "split")[mode]
    expected = [f"{k}.{i}" for k in _text_kinds(setup) for i in range(setup["blocks"][k])]
    assert [c["block"] for c in r["columns"]] == expected == r["patched"]
    for col in r["columns"]:
        assert col["txt_len"] > 0 and col["reported_txt_len"] == col["txt_len"], col
        assert col["max_abs"] <= 1e-5, col
        assert col["gated"] == 0  # the probe scores without rotating


@pytest.mark.parametrize("case,mode", MODES)
def test_lrs_visualizer_shows_the_concept_tokens_gated_and_nothing_for_safe_prompts(families, case, mode):
    v = result(families, case, "visualizer")
    r = v[mode]
    triggers = set(v["expected_triggers"])
    assert len(triggers) == 3
    assert r["unsafe_columns"] and len(r["unsafe_columns"]) == len(r["safe_columns"])
    for col in r["unsafe_columns"]:
        assert triggers <= set(col["gated"]), col
        assert col["txt_len"] == v["spans"][col["kind"]][0]
    assert all(col["gated"] == [] for col in r["safe_columns"])
    text_len = max(col["txt_len"] for col in r["unsafe_columns"])
    gated = int(re.search(r"text tokens gated in any block: (\d+) of (\d+)", r["unsafe_summary"]).group(1))
    assert gated >= 3 and f"of {text_len}" in r["unsafe_summary"]
    assert f"text tokens gated in any block: 0 of {text_len}" in r["safe_summary"]
    top = re.search(r"top tokens: (.*)", r["unsafe_summary"]).group(1)
    assert {int(t) for t in re.findall(r"#(\d+)", top)[:3]} == triggers
    b, h, w, c = r["image_shape"]
    assert (b, c) == (1, 3) and h > 100 and w > 100 and 0.0 <= r["image_range"][0] < r["image_range"][1] <= 1.0


# -- fail closed ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_an_adapter_of_another_family_with_equal_shapes_is_rejected(families, case):
    r = result(families, case, "wrong_family")
    family = TINIES[case].family
    for how in ("node", "object_mode"):
        e = r[how]
        assert e["raised"] == "IncompatibleAdapterError", e
        assert f"({r['other']})" in e["message"] and f"({family}) model" in e["message"]


@pytest.mark.parametrize("what", ["hooks_removed_unsafe", "hooks_removed_safe", "block_skipped"])
@pytest.mark.parametrize("case,mode", MODES)
def test_a_hook_that_did_not_run_raises(families, case, mode, what):
    r = result(families, case, "fail_closed")[mode]
    e = r[what]
    assert e["raised"] == "HookNotRunError" and "SafeRoPEError" in e["bases"], e
    assert f"{case}.safetensors" in e["message"] and "did not run" in e["message"]
    assert ("attn1_patch" if mode == "attn1" else "object patch") in e["message"]
    if what == "block_skipped":
        assert r["first_block"] in e["message"], (r["skipped_how"], e["message"])
    assert r["after_ok"]["raised"] is None


# -- ComfyUI vs diffusers ------------------------------------------------------------------------------
@only_if(PARITY)
@pytest.mark.parametrize("case", PARITY)
def test_comfyui_and_diffusers_agree_on_the_same_weights(families, case):
    r = result(families, case, "parity")
    assert "unavailable" not in r, r.get("unavailable")
    assert r["key_map"]
    for name in ("base", "adapter"):
        assert r[name]["max_abs"] <= 1e-5 * r[name]["scale"], (name, r[name])
    assert r["delta_norm"] > 0.0 and r["delta_rel"] <= 1e-4


@only_if(NO_PARITY_CASES)
@pytest.mark.parametrize("case", NO_PARITY_CASES)
def test_parity_is_impossible_where_no_key_map_converts_the_weights(families, case):
    """Not a skip: the driver tried, and what stopped it is recorded (the README's support table says so)."""
    r = result(families, case, "parity")
    assert NO_PARITY[case] in r.get("unavailable", ""), r


# -- unsupported models ------------------------------------------------------------------------------------
@only_if(UNSUPPORTED)
@pytest.mark.parametrize("case", UNSUPPORTED)
def test_unsupported_models_get_an_error_naming_what_was_found(families, case):
    r = result(families, case, "unsupported")
    for how in ("apply", "object_mode"):
        e = r[how]
        assert e["raised"] == "UnsupportedModelError", e
        assert f"ComfyUI model class {r['model_class']!r}" in e["message"]
        assert f"diffusion model {r['diffusion_model']!r}" in e["message"]
        assert REASONS[case] in e["message"] and "Supported families" in e["message"]
    assert r["state_unchanged"]
