"""Consistency checks of ComfyUI frontend workflows (format 0.4), subgraphs included, and a way to put
the three SafeRoPE nodes into any FLUX workflow.

Pure Python (no ComfyUI import): ``tests/test_nodes_workflows.py`` uses it without ComfyUI, with
our own node definitions; the driver (``driver_scenarios.workflows``) with every node definition
of a real ComfyUI (``NODE_CLASS_MAPPINGS``), for the example workflows and for ComfyUI's own FLUX
templates with our nodes inserted.

The frontend serialises a graph as ``nodes`` plus ``links``; the top level's links are lists
``[id, origin, origin_slot, target, target_slot, type]``, a subgraph's (in
``definitions.subgraphs``) are objects with those fields, and a subgraph's own inputs/outputs
are the pseudo-nodes ``inputNode``/``outputNode`` (ids -10 and -20). A node whose ``type`` is a
subgraph's id is an instance of that subgraph.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

#: node types the frontend draws itself (no Python class behind them)
FRONTEND_ONLY = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})


@dataclass(frozen=True)
class Link:
    id: int
    origin: int
    origin_slot: int
    target: int
    target_slot: int
    type: str


def links_of(graph: Mapping[str, Any]) -> list[Link]:
    """The graph's links, whichever of the two serialisations it uses."""
    out = []
    for lk in graph.get("links", []):
        if isinstance(lk, Mapping):
            out.append(Link(lk["id"], lk["origin_id"], lk["origin_slot"], lk["target_id"], lk["target_slot"], lk["type"]))
        else:
            out.append(Link(*lk[:6]))
    return out


def graphs(wf: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """``("top", wf)`` and ``("subgraph <name>", definition)`` for every subgraph definition, nested ones too."""
    yield "top", wf
    seen: set[str] = set()
    stack = list(wf.get("definitions", {}).get("subgraphs", []))
    while stack:
        sg = stack.pop(0)
        if sg["id"] in seen:
            continue
        seen.add(sg["id"])
        yield f"subgraph {sg.get('name') or sg['id']}", sg
        stack.extend(sg.get("definitions", {}).get("subgraphs", []))


def subgraph_ids(wf: Mapping[str, Any]) -> set[str]:
    return {g["id"] for label, g in graphs(wf) if label != "top"}


def all_nodes(wf: Mapping[str, Any]) -> Iterator[tuple[str, dict]]:
    """``(graph label, node)`` for every node of every graph."""
    for label, g in graphs(wf):
        for n in g.get("nodes", []):
            yield label, n


def well_formed(wf: Mapping[str, Any]) -> list[str]:
    """Problems with ids, links and slots, per graph (empty when the workflow is consistent)."""
    problems: list[str] = []
    for label, g in graphs(wf):
        nodes = {n["id"]: n for n in g.get("nodes", [])}
        if len(nodes) != len(g.get("nodes", [])):
            problems.append(f"{label}: duplicate node ids")
        io = {}
        if label != "top":
            io = {g["inputNode"]["id"]: ("inputs", g.get("inputs", [])), g["outputNode"]["id"]: ("outputs", g.get("outputs", []))}
        links = links_of(g)
        ids = {lk.id for lk in links}
        if len(ids) != len(links):
            problems.append(f"{label}: duplicate link ids")
        for lk in links:
            where = f"{label}: link {lk.id}"
            if lk.origin in io:
                slots = io[lk.origin][1]
                if lk.origin_slot >= len(slots) or lk.id not in slots[lk.origin_slot].get("linkIds", []):
                    problems.append(f"{where}: subgraph input slot {lk.origin_slot} does not list it")
            elif lk.origin not in nodes:
                problems.append(f"{where}: origin node {lk.origin} missing")
            else:
                outs = nodes[lk.origin].get("outputs", [])
                if lk.origin_slot >= len(outs) or lk.id not in (outs[lk.origin_slot].get("links") or []):
                    problems.append(f"{where}: output slot {lk.origin_slot} of node {lk.origin} does not list it")
                elif outs[lk.origin_slot]["type"] != lk.type:
                    problems.append(f"{where}: type {lk.type} != output type {outs[lk.origin_slot]['type']}")
            if lk.target in io:
                slots = io[lk.target][1]
                if lk.target_slot >= len(slots) or lk.id not in slots[lk.target_slot].get("linkIds", []):
                    problems.append(f"{where}: subgraph output slot {lk.target_slot} does not list it")
            elif lk.target not in nodes:
                problems.append(f"{where}: target node {lk.target} missing")
            else:
                ins = nodes[lk.target].get("inputs", [])
                if lk.target_slot >= len(ins) or ins[lk.target_slot].get("link") != lk.id:
                    problems.append(f"{where}: input slot {lk.target_slot} of node {lk.target} does not hold it")
                elif ins[lk.target_slot]["type"] not in (lk.type, "*") and lk.type != "*":
                    problems.append(f"{where}: type {lk.type} into input of type {ins[lk.target_slot]['type']}")
        for n in nodes.values():
            for i in n.get("inputs", []):
                if i.get("link") is not None and i["link"] not in ids:
                    problems.append(f"{label}: node {n['id']} input {i['name']} holds unknown link {i['link']}")
            for o in n.get("outputs", []):
                for lid in o.get("links") or []:
                    if lid not in ids:
                        problems.append(f"{label}: node {n['id']} output {o['name']} lists unknown link {lid}")
    return problems


def _opts(s: Any) -> dict:
    return s[1] if isinstance(s, (list, tuple)) and len(s) > 1 and isinstance(s[1], Mapping) else {}


def widgets(spec: Mapping[str, Any], linked: set[str] = frozenset()) -> list[tuple[str, Any, dict]]:
    """``(name, type, options)`` of each widget value a node serialises, in the frontend's order.

    Widgets are the inputs of widget types (INT, FLOAT, STRING, BOOLEAN, a combo) that are not
    ``forceInput`` and not turned into a plain socket (``linked``); a seed-like INT serialises a
    second value, its control_after_generate mode.
    """
    out = []
    for section in ("required", "optional"):
        for name, s in spec.get(section, {}).items():
            kind, opts = s[0], _opts(s)
            is_widget = isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES
            if not is_widget or opts.get("forceInput") or name in linked:
                continue
            out.append((name, kind, opts))
            if kind == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")):
                out.append((name + ":control", "CONTROL", {}))
    return out


def check_nodes(wf: Mapping[str, Any], specs: Mapping[str, Mapping[str, Any]]) -> dict:
    """Every node type exists (in ``specs``: type -> INPUT_TYPES, or as a subgraph of the workflow) and
    every node's widget-value count matches its inputs. Returns counts, ``missing`` and ``mismatched``."""
    sub = subgraph_ids(wf)
    missing, mismatched, counted, instances = [], [], 0, 0
    for label, n in all_nodes(wf):
        t = n["type"]
        counted += 1
        if t in FRONTEND_ONLY:
            continue
        if t in sub:
            instances += 1
            continue
        spec = specs.get(t)
        if spec is None:
            missing.append(f"{label}: {t}")
            continue
        linked = {i["name"] for i in n.get("inputs", []) if i.get("link") is not None and "widget" not in i}
        expected = len(widgets(spec, linked))
        values = n.get("widgets_values", [])
        got = len(values) if isinstance(values, list) else None
        if got != expected:
            mismatched.append({"graph": label, "id": n["id"], "type": t, "widgets": got, "expected": expected})
    return {"nodes": counted, "subgraphs": len(sub), "subgraph_instances": instances, "missing": missing,
            "mismatched": mismatched}


# -- inserting the SafeRoPE nodes ---------------------------------------------------------------------------
class _Ids:
    """Fresh node/link ids for a workflow (the frontend keeps one counter for all graphs)."""

    def __init__(self, wf: dict) -> None:
        node_ids = [n["id"] for _, n in all_nodes(wf)] + [wf.get("last_node_id", 0)]
        link_ids = [lk.id for _, g in graphs(wf) for lk in links_of(g)] + [wf.get("last_link_id", 0)]
        for _, g in graphs(wf):
            node_ids.append(g.get("state", {}).get("lastNodeId", 0))
            link_ids.append(g.get("state", {}).get("lastLinkId", 0))
        self.node, self.link = max(node_ids), max(link_ids)

    def new_node(self) -> int:
        self.node += 1
        return self.node

    def new_link(self) -> int:
        self.link += 1
        return self.link

    def store(self, wf: dict) -> None:
        wf["last_node_id"], wf["last_link_id"] = self.node, self.link
        for _, g in graphs(wf):
            if "state" in g:
                g["state"]["lastNodeId"], g["state"]["lastLinkId"] = self.node, self.link


def node_from_spec(type_: str, spec: Mapping[str, Any], outputs: list[tuple[str, str]], node_id: int,
                   pos: list[float], choices: Mapping[str, Any] | None = None) -> dict:
    """A node as the frontend saves it: sockets for non-widget inputs, defaults for the widgets
    (``choices`` overrides values by input name; a combo without one takes its first option)."""
    inputs, values = [], []
    for section in ("required", "optional"):
        for name, s in spec.get(section, {}).items():
            kind = s[0]
            if not (isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES) or _opts(s).get("forceInput"):
                inputs.append({"name": name, "type": kind, "link": None})
    for name, kind, opts in widgets(spec):
        if kind == "CONTROL":
            values.append("fixed")
        elif choices and name in choices:
            values.append(choices[name])
        elif isinstance(kind, (list, tuple)):
            values.append(kind[0] if kind else "")
        else:
            values.append(opts.get("default", opts.get("options", [""])[0] if kind == "COMBO" else 0))
    return {"id": node_id, "type": type_, "pos": list(pos), "size": [320, 120], "flags": {}, "order": 0, "mode": 0,
            "inputs": inputs, "outputs": [{"name": n, "type": t, "links": []} for n, t in outputs],
            "properties": {"Node name for S&R": type_}, "widgets_values": values}


def _add_link(g: dict, ids: _Ids, src: dict, src_slot: int, dst: dict, dst_name: str) -> None:
    lid = ids.new_link()
    slot = next(i for i, x in enumerate(dst["inputs"]) if x["name"] == dst_name)
    typ = src["outputs"][src_slot]["type"]
    src["outputs"][src_slot].setdefault("links", [])
    src["outputs"][src_slot]["links"] = list(src["outputs"][src_slot]["links"] or []) + [lid]
    dst["inputs"][slot]["link"] = lid
    if g["links"] and isinstance(g["links"][0], Mapping) or "inputNode" in g:
        g["links"].append({"id": lid, "origin_id": src["id"], "origin_slot": src_slot, "target_id": dst["id"],
                           "target_slot": slot, "type": typ})
    else:
        g["links"].append([lid, src["id"], src_slot, dst["id"], slot, typ])


def _source_of(g: Mapping[str, Any], node: Mapping[str, Any], input_name: str) -> tuple[dict, int] | None:
    inp = next((i for i in node.get("inputs", []) if i["name"] == input_name), None)
    if inp is None or inp.get("link") is None:
        return None
    lk = next(lk for lk in links_of(g) if lk.id == inp["link"])
    src = next((n for n in g["nodes"] if n["id"] == lk.origin), None)
    return (src, lk.origin_slot) if src is not None else None


def insert_saferope(wf: Mapping[str, Any], specs: Mapping[str, Mapping[str, Any]],
                    outputs: Mapping[str, list[tuple[str, str]]], adapter: str, *,
                    sampler_types: tuple[str, ...] = ("KSampler", "KSamplerAdvanced")) -> tuple[dict, str]:
    """A copy of ``wf`` with Load SafeRoPE Adapter → Apply SafeRoPE to Model between the sampler and
    whatever gives it the model, and an LRS Visualizer (model, the sampler's positive conditioning,
    the CLIP of that conditioning's encoder when there is one) feeding a PreviewImage — in whichever
    graph (top level or subgraph) holds the sampler. ``specs``/``outputs``: INPUT_TYPES and
    ``[(name, type)]`` outputs of the node types used. Returns ``(workflow, graph label)``."""
    out = copy.deepcopy(dict(wf))
    ids = _Ids(out)
    for label, g in graphs(out):
        sampler = next((n for n in g.get("nodes", []) if n["type"] in sampler_types), None)
        if sampler is None:
            continue
        model_in = next(i for i in sampler["inputs"] if i["name"] == "model")
        lk = next(lk for lk in links_of(g) if lk.id == model_in["link"])
        src = next(n for n in g["nodes"] if n["id"] == lk.origin)  # the node that gave the sampler its model
        x, y = sampler.get("pos", [0, 0])[:2]
        loader = node_from_spec("SafeRoPEAdapterLoader", specs["SafeRoPEAdapterLoader"], outputs["SafeRoPEAdapterLoader"],
                                ids.new_node(), [x - 380, y + 200], {"adapter_name": adapter})
        apply = node_from_spec("SafeRoPEApply", specs["SafeRoPEApply"], outputs["SafeRoPEApply"], ids.new_node(), [x - 380, y])
        vis = node_from_spec("SafeRoPELRSVisualizer", specs["SafeRoPELRSVisualizer"], outputs["SafeRoPELRSVisualizer"],
                             ids.new_node(), [x, y + 400])
        preview = node_from_spec("PreviewImage", specs["PreviewImage"], outputs.get("PreviewImage", []), ids.new_node(),
                                 [x + 420, y + 400])
        g["nodes"].extend([loader, apply, vis, preview])
        # re-route the sampler's model through Apply
        src["outputs"][lk.origin_slot]["links"] = [i for i in src["outputs"][lk.origin_slot]["links"] if i != lk.id]
        g["links"] = [x_ for x_ in g["links"] if (x_["id"] if isinstance(x_, Mapping) else x_[0]) != lk.id]
        model_in["link"] = None
        _add_link(g, ids, src, lk.origin_slot, apply, "model")
        _add_link(g, ids, loader, 0, apply, "adapter")
        _add_link(g, ids, apply, 0, sampler, "model")
        _add_link(g, ids, apply, 0, vis, "model")
        cond = _source_of(g, sampler, "positive")
        if cond is not None:
            _add_link(g, ids, cond[0], cond[1], vis, "conditioning")
            clip = _source_of(g, cond[0], "clip")
            if clip is not None:
                _add_link(g, ids, clip[0], clip[1], vis, "clip")
        _add_link(g, ids, vis, 0, preview, "images")
        ids.store(out)
        return out, label
    raise ValueError(f"no sampler of type {sampler_types} in the workflow")
