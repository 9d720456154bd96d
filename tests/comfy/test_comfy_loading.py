"""The pack loads through ComfyUI's own custom-node loader; the loader node; the example workflows."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.comfyui

IDS = {"SafeRoPEAdapterLoader": "Load SafeRoPE Adapter", "SafeRoPEApply": "Apply SafeRoPE to Model",
       "SafeRoPELRSVisualizer": "LRS Visualizer"}


def test_pack_is_loaded_by_comfyui_custom_node_loader(driver, scenario):
    r = scenario("load")
    assert {k: v for k, v in r["nodes"].items() if k in IDS} == IDS
    assert r["relative_module"] == "custom_nodes.comfyui-saferope"  # set by ComfyUI's load_custom_node
    assert r["comfy_nodes_is_comfyui"] and not r["repo_on_sys_path"]
    assert driver["info"]["pack_file"].endswith("custom_nodes/comfyui-saferope/__init__.py")


def test_model_folder_is_registered_with_extra_paths_and_lists_only_safetensors(driver, scenario):
    r = scenario("load")
    assert r["saferope_folders"][0].endswith("models/saferope")  # the default folder comes first
    assert any(p.endswith("assets/adapters") for p in r["saferope_folders"])  # an extra path
    assert r["saferope_extensions"] == [".safetensors"]
    assert "main.safetensors" in r["loader_choices"] and "corrupt.safetensors" in r["loader_choices"]


def test_every_input_has_a_tooltip_in_comfyui(driver, scenario):
    for node, spec in scenario("load")["input_types"].items():
        if node not in IDS:
            continue
        for section in spec.values():
            for name, s in section.items():
                assert len(s) > 1 and s[1].get("tooltip"), (node, name)


def test_bad_adapter_files_are_errors_that_name_the_file_and_the_problem(driver, scenario):
    r = scenario("loader_errors")
    c = r["corrupt.safetensors"]
    assert c["raised"] == "AdapterFormatError" and "corrupt.safetensors" in c["message"] and "safetensors" in c["message"]
    m = r["no_metadata.safetensors"]
    assert m["raised"] == "AdapterFormatError" and "no_metadata.safetensors" in m["message"] and "metadata" in m["message"]
    a = r["absent.safetensors"]
    assert a["raised"] == "FileNotFoundError" and "absent.safetensors" in a["message"] and "models/saferope" in a["message"]
    assert r["good"]["blocks"] == 4
    d = r["dangling.safetensors"]
    assert d["raised"] == "FileNotFoundError" and "is a broken symbolic link pointing to" in d["message"]
    assert "moved/adapter.safetensors" in d["message"] and "not found" not in d["message"]


def test_example_workflows_use_only_existing_nodes_with_matching_widgets(driver, scenario):
    r = scenario("workflows")["examples"]
    assert sorted(r) == ["saferope_compare_base_vs_saferope.json", "saferope_flux_dev_text_to_image.json",
                         "saferope_risk_check_branch.json", "saferope_toy_demo.json"]
    for name, res in r.items():
        assert res["mismatched"] == [] and res["well_formed"] == [], (name, res)
        # a workflow may need a core node newer than some supported ComfyUI; it says so, and only that may be missing
        missing = {m.split(": ", 1)[-1] for m in res["missing"]}  # "top: Type" / "subgraph …: Type"
        assert missing <= set(res["requires"]) and missing == set(res["requires_absent"]), res
        if name == "saferope_risk_check_branch.json":
            assert res["saferope_nodes"] == ["SafeRoPEAdapterLoader", "SafeRoPEApply", "SafeRoPERiskCheck"]
        elif name == "saferope_toy_demo.json":  # the toy's own loader, encoder, latent and decoder nodes
            assert {"SafeRoPEAdapterLoader", "SafeRoPEApply"} <= set(res["saferope_nodes"]), res["saferope_nodes"]
            assert any(n.startswith("SafeRoPEToy") for n in res["saferope_nodes"]), res["saferope_nodes"]
        else:
            assert res["saferope_nodes"] == ["SafeRoPEAdapterLoader", "SafeRoPEApply", "SafeRoPELRSVisualizer"]


def test_comfyui_flux_template_with_our_nodes_inserted_passes_the_check(driver, scenario):
    """ComfyUI's own FLUX.1-dev template (its template package, subgraphs on newer trees) + our three nodes."""
    r = scenario("workflows")["templates"]
    assert list(r) == ["flux_dev_full_text_to_image.json"], "the tree's template package has no FLUX.1-dev template"
    t = r["flux_dev_full_text_to_image.json"]
    for which in ("original", "inserted"):
        assert t[which]["missing"] == [] and t[which]["mismatched"] == [] and t[which]["well_formed"] == [], (which, t)
    assert t["original"]["saferope_nodes"] == []
    assert t["inserted"]["saferope_nodes"] == ["SafeRoPEAdapterLoader", "SafeRoPEApply", "SafeRoPELRSVisualizer"]
    assert t["inserted"]["nodes"] == t["original"]["nodes"] + 4  # + PreviewImage of the heatmap
    if t["original"]["subgraphs"]:  # the new frontend's templates keep the pipeline in a subgraph
        assert t["inserted_in"].startswith("subgraph ") and t["original"]["subgraph_instances"] >= 1
    else:
        assert t["inserted_in"] == "top"
