"""The example workflows: well-formed graphs, known node types, our nodes' widgets match our inputs.

Core node types are checked against the list below here; the ComfyUI-backed tests check the same
files against every node type and input definition of a real ComfyUI (tests/comfy).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "comfy"))
from packload import REPO, load_pack  # noqa: E402

PACK = load_pack()
FILES = sorted((REPO / "example_workflows").glob("*.json"))
CORE = {"UNETLoader", "DualCLIPLoader", "VAELoader", "CLIPTextEncode", "FluxGuidance", "EmptySD3LatentImage",
        "KSampler", "VAEDecode", "SaveImage", "PreviewImage", "PreviewAny", "ImageStitch", "ImageScaleBy"}
FRONTEND_ONLY = {"MarkdownNote", "Note", "Reroute"}
WIDGET_TYPES = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_both_example_workflows_exist():
    assert [p.name for p in FILES] == ["saferope_compare_base_vs_saferope.json", "saferope_flux_dev_text_to_image.json",
                                       "saferope_toy_demo.json"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_graph_is_well_formed(path):
    wf = load(path)
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] >= max(nodes)
    assert wf["last_link_id"] >= max(link[0] for link in wf["links"])
    for lid, src, sslot, dst, dslot, typ in wf["links"]:
        out, inp = nodes[src]["outputs"][sslot], nodes[dst]["inputs"][dslot]
        assert lid in out["links"] and inp["link"] == lid
        assert typ == out["type"] and inp["type"] in (typ, "*")
    linked = {link[0] for link in wf["links"]}
    for n in wf["nodes"]:
        assert {i["link"] for i in n.get("inputs", []) if i["link"] is not None} <= linked
        assert all(lid in linked for o in n.get("outputs", []) for lid in o["links"])


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_node_types_are_core_or_ours(path):
    types = {n["type"] for n in load(path)["nodes"]}
    assert types <= CORE | FRONTEND_ONLY | set(PACK.NODE_CLASS_MAPPINGS), types - CORE - FRONTEND_ONLY
    product = {n for n in PACK.NODE_CLASS_MAPPINGS if not n.startswith("SafeRoPEToy")}
    assert product <= types  # every workflow shows all three product nodes
    if path.stem == "saferope_toy_demo":
        assert set(PACK.NODE_CLASS_MAPPINGS) - product <= types  # and the toy workflow every toy node


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
    for n in load(path)["nodes"]:
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
