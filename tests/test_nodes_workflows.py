"""The example workflows: well-formed graphs, known node types, our nodes' widgets match our inputs.

Without ComfyUI, core node types are checked against the list below (every graph, subgraphs
included, through ``tests/comfy/workflow_check.py``); the ComfyUI-backed tests check the same
files, and ComfyUI's own FLUX template with our nodes inserted, against every node definition of a
real ComfyUI (``NODE_CLASS_MAPPINGS``, tests/comfy ``workflows`` scenario).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "comfy"))
import workflow_check as wc  # noqa: E402
from packload import REPO, load_pack  # noqa: E402

PACK = load_pack()
FILES = sorted((REPO / "example_workflows").glob("*.json"))
CORE = {"UNETLoader", "DualCLIPLoader", "VAELoader", "CLIPTextEncode", "FluxGuidance", "EmptySD3LatentImage",
        "KSampler", "VAEDecode", "SaveImage", "PreviewImage", "PreviewAny", "ImageStitch", "ImageScaleBy", "EmptyImage",
        "ComfySwitchNode"}
FRONTEND_ONLY = {"MarkdownNote", "Note", "Reroute"}
WIDGET_TYPES = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_both_example_workflows_exist():
    assert [p.name for p in FILES] == ["saferope_compare_base_vs_saferope.json", "saferope_flux_dev_text_to_image.json",
                                       "saferope_risk_check_branch.json", "saferope_toy_demo.json"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_graph_is_well_formed(path):
    wf = load(path)
    assert wf["version"] == 0.4
    assert wc.well_formed(wf) == []
    assert wf["last_node_id"] >= max(n["id"] for _, n in wc.all_nodes(wf))
    assert wf["last_link_id"] >= max(lk.id for _, g in wc.graphs(wf) for lk in wc.links_of(g))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_node_types_are_core_or_ours(path):
    wf = load(path)
    types = {n["type"] for _, n in wc.all_nodes(wf)} - wc.subgraph_ids(wf)
    assert types <= CORE | FRONTEND_ONLY | set(PACK.NODE_CLASS_MAPPINGS), types - CORE - FRONTEND_ONLY
    product = {"SafeRoPEAdapterLoader", "SafeRoPEApply"}
    assert product <= types  # every workflow loads and applies an adapter
    assert types & {"SafeRoPELRSVisualizer", "SafeRoPERiskCheck"}  # and shows why (heatmap) or whether (flag)
    if path.stem == "saferope_toy_demo":
        assert {n for n in PACK.NODE_CLASS_MAPPINGS if n.startswith("SafeRoPEToy")} <= types  # and every toy node


def _widgets(spec: dict) -> list[tuple[str, object, dict]]:
    """(name, type, options) of each widget in frontend order, plus control_after_generate slots."""
    out = []
    for section in ("required", "optional"):
        for name, s in spec.get(section, {}).items():
            kind, opts = s[0], s[1] if len(s) > 1 else {}
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                out.append((name, kind, opts))
                if kind == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")):
                    out.append((name + ":control", "CONTROL", {}))
    return out


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_our_nodes_widget_values_match_our_inputs(path):
    for _, n in wc.all_nodes(load(path)):
        cls = PACK.NODE_CLASS_MAPPINGS.get(n["type"])
        if cls is None:
            continue
        spec = cls.INPUT_TYPES()
        widgets = _widgets(spec)
        values = n["widgets_values"]
        assert len(values) == len(widgets), (n["type"], values, [w[0] for w in widgets])
        for (name, kind, opts), v in zip(widgets, values):
            if kind == "CONTROL":
                assert v in ("fixed", "increment", "decrement", "randomize"), (name, v)
            elif isinstance(kind, list):
                assert isinstance(v, str) and v.endswith(".safetensors"), (name, v)
            else:
                assert isinstance(v, WIDGET_TYPES[kind]) and not isinstance(v, bool) or kind == "BOOLEAN", (name, v)
                assert opts.get("min", v) <= v <= opts.get("max", v), (name, v, opts)
        sockets = {name: s[0] for sec in spec.values() for name, s in sec.items()
                   if not isinstance(s[0], list) and s[0] not in WIDGET_TYPES}
        assert {i["name"]: i["type"] for i in n["inputs"]} == sockets
        assert [o["type"] for o in n["outputs"]] == list(cls.RETURN_TYPES)


def _source(wf: dict, node: dict, name: str) -> dict:
    link = next(i["link"] for i in node["inputs"] if i["name"] == name)
    src = next(lk[1] for lk in wf["links"] if lk[0] == link)
    return next(n for n in wf["nodes"] if n["id"] == src)


def test_text_to_image_puts_apply_between_loader_and_sampler():
    wf = load(REPO / "example_workflows" / "saferope_flux_dev_text_to_image.json")
    (ks,) = [n for n in wf["nodes"] if n["type"] == "KSampler"]
    apply = _source(wf, ks, "model")
    assert apply["type"] == "SafeRoPEApply" and _source(wf, apply, "model")["type"] == "UNETLoader"
    assert _source(wf, apply, "adapter")["type"] == "SafeRoPEAdapterLoader"
    (vis,) = [n for n in wf["nodes"] if n["type"] == "SafeRoPELRSVisualizer"]
    assert _source(wf, vis, "model")["id"] == apply["id"] and _source(wf, vis, "clip")["type"] == "DualCLIPLoader"


def test_comparison_uses_the_same_seed_and_inputs_for_base_and_saferope():
    wf = load(REPO / "example_workflows" / "saferope_compare_base_vs_saferope.json")
    a, b = [n for n in wf["nodes"] if n["type"] == "KSampler"]
    assert a["widgets_values"] == b["widgets_values"] and a["widgets_values"][1] == "fixed"
    for name in ("positive", "negative", "latent_image"):
        assert _source(wf, a, name)["id"] == _source(wf, b, name)["id"]
    models = sorted(_source(wf, n, "model")["type"] for n in (a, b))
    assert models == ["SafeRoPEApply", "UNETLoader"]


def test_committed_workflows_are_what_the_generator_writes(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_example_workflows.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    for path in FILES:
        assert load(tmp_path / path.name) == load(path), f"{path.name} is out of date: run scripts/build_example_workflows.py"


# -- the checker itself (what the ComfyUI-backed tests run against a real node list) -----------------------
OURS = {t: cls.INPUT_TYPES() for t, cls in PACK.NODE_CLASS_MAPPINGS.items()}
OUT = {t: list(zip(cls.RETURN_NAMES, cls.RETURN_TYPES)) for t, cls in PACK.NODE_CLASS_MAPPINGS.items()}
#: stand-ins for three core nodes (their inputs as ComfyUI defines them)
CORE_SPECS = {"UNETLoader": {"required": {"unet_name": (["flux1-dev.safetensors"],), "weight_dtype": (["default"],)}},
              "KSampler": {"required": {"model": ("MODEL",), "seed": ("INT", {"control_after_generate": True}),
                                        "steps": ("INT",), "positive": ("CONDITIONING",)}},
              "CLIPTextEncode": {"required": {"text": ("STRING", {"multiline": True}), "clip": ("CLIP",)}},
              "DualCLIPLoader": {"required": {"clip_name1": (["a"],)}}, "PreviewImage": {"required": {"images": ("IMAGE",)}}}
CORE_OUT = {"PreviewImage": []}


def subgraph_workflow() -> dict:
    """The new frontend's layout: the pipeline inside a subgraph (object links, io nodes -10/-20)."""
    def node(i, t, inputs, outputs, widgets):
        return {"id": i, "type": t, "inputs": [{"name": n, "type": ty, "link": lk} for n, ty, lk in inputs],
                "outputs": [{"name": n, "type": ty, "links": lks} for n, ty, lks in outputs], "widgets_values": widgets}

    sub = {"id": "sg-1", "name": "Text to Image", "inputNode": {"id": -10}, "outputNode": {"id": -20},
           "inputs": [], "outputs": [{"name": "LATENT", "type": "LATENT", "linkIds": [4]}], "state": {"lastNodeId": 9},
           "nodes": [node(5, "UNETLoader", [], [("MODEL", "MODEL", [1])], ["flux1-dev.safetensors", "default"]),
                     node(6, "DualCLIPLoader", [], [("CLIP", "CLIP", [2])], ["a"]),
                     node(7, "CLIPTextEncode", [("clip", "CLIP", 2)], [("CONDITIONING", "CONDITIONING", [3])], ["a cat"]),
                     node(8, "KSampler", [("model", "MODEL", 1), ("positive", "CONDITIONING", 3)],
                          [("LATENT", "LATENT", [4])], [0, "fixed", 20])],
           "links": [{"id": 1, "origin_id": 5, "origin_slot": 0, "target_id": 8, "target_slot": 0, "type": "MODEL"},
                     {"id": 2, "origin_id": 6, "origin_slot": 0, "target_id": 7, "target_slot": 0, "type": "CLIP"},
                     {"id": 3, "origin_id": 7, "origin_slot": 0, "target_id": 8, "target_slot": 1, "type": "CONDITIONING"},
                     {"id": 4, "origin_id": 8, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "LATENT"}]}
    top = node(9, "sg-1", [], [("LATENT", "LATENT", [])], [])
    return {"last_node_id": 9, "last_link_id": 4, "nodes": [top], "links": [], "version": 0.4,
            "definitions": {"subgraphs": [sub]}}


def test_checker_follows_subgraphs_and_reports_what_is_wrong_inside():
    wf = subgraph_workflow()
    specs = {**CORE_SPECS, **OURS}
    assert wc.well_formed(wf) == [] and wc.check_nodes(wf, specs)["missing"] == []
    r = wc.check_nodes(wf, specs)
    assert (r["nodes"], r["subgraphs"], r["subgraph_instances"], r["mismatched"]) == (5, 1, 1, [])
    sub = wf["definitions"]["subgraphs"][0]
    sub["nodes"][3]["widgets_values"].pop()  # a widget value lost inside the subgraph
    sub["nodes"].append({"id": 10, "type": "NoSuchNode", "inputs": [], "outputs": [], "widgets_values": []})
    sub["links"][2]["target_slot"] = 0  # a link pointing at the wrong slot
    r = wc.check_nodes(wf, specs)
    assert r["missing"] == ["subgraph Text to Image: NoSuchNode"]
    assert r["mismatched"] == [{"graph": "subgraph Text to Image", "id": 8, "type": "KSampler", "widgets": 2, "expected": 3}]
    assert any("link 3: input slot 0 of node 8 does not hold it" in p for p in wc.well_formed(wf))


def test_saferope_nodes_go_into_the_subgraph_that_holds_the_sampler():
    specs = {**CORE_SPECS, **OURS}
    wf, where = wc.insert_saferope(subgraph_workflow(), specs, {**CORE_OUT, **OUT}, "main.safetensors")
    assert where == "subgraph Text to Image" and wc.well_formed(wf) == []
    r = wc.check_nodes(wf, specs)
    assert r["missing"] == [] and r["mismatched"] == [] and r["nodes"] == 9
    sub = wf["definitions"]["subgraphs"][0]
    by_type = {n["type"]: n for n in sub["nodes"]}
    assert by_type["SafeRoPEAdapterLoader"]["widgets_values"] == ["main.safetensors"]
    assert by_type["SafeRoPEApply"]["widgets_values"] == [1.0, -1.0, 0.0, 1.0]
    links = {(lk.origin, lk.target, lk.type) for lk in wc.links_of(sub)}
    apply, vis = by_type["SafeRoPEApply"]["id"], by_type["SafeRoPELRSVisualizer"]["id"]
    assert {(5, apply, "MODEL"), (apply, 8, "MODEL"), (apply, vis, "MODEL"), (7, vis, "CONDITIONING"),
            (6, vis, "CLIP")} <= links and (5, 8, "MODEL") not in links
    assert wf["last_node_id"] == sub["state"]["lastNodeId"] == 13  # one id counter for all graphs
