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


def test_example_workflows_use_only_existing_nodes_with_matching_widgets(driver, scenario):
    r = scenario("workflows")
    names = [k for k in r if k.endswith(".json")]
    assert len(names) == 3
    for name in names:
        assert r[name]["missing"] == [], (name, r[name]["missing"])
        assert r[name]["mismatched"] == [], (name, r[name]["mismatched"])
