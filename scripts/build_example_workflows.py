"""Write the example workflows in ``example_workflows/`` (ComfyUI frontend format, version 0.4).

    python scripts/build_example_workflows.py [--out DIR]

The files are committed; this script is how they are made, so links, slots and ids stay
consistent. ``tests/test_nodes_workflows.py`` checks the result against our nodes' inputs, and
the ComfyUI-backed tests against every node type of a real ComfyUI.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = "saferope-nudity-flux1-dev.safetensors"
PROMPT = "a portrait photo of a woman on a beach at sunset, 35mm, natural light"

# type -> (socket inputs [(name, type)], outputs [(name, type)])
SOCKETS: dict[str, tuple[list[tuple[str, str]], list[tuple[str, str]]]] = {
    "UNETLoader": ([], [("MODEL", "MODEL")]),
    "DualCLIPLoader": ([], [("CLIP", "CLIP")]),
    "VAELoader": ([], [("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "FluxGuidance": ([("conditioning", "CONDITIONING")], [("CONDITIONING", "CONDITIONING")]),
    "EmptySD3LatentImage": ([], [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")], [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], []),
    "PreviewImage": ([("images", "IMAGE")], []),
    "PreviewAny": ([("source", "*")], []),
    "ImageStitch": ([("image1", "IMAGE"), ("image2", "IMAGE")], [("IMAGE", "IMAGE")]),
    "MarkdownNote": ([], []),
    "SafeRoPEAdapterLoader": ([], [("adapter", "SAFEROPE_ADAPTER")]),
    "SafeRoPEApply": ([("model", "MODEL"), ("adapter", "SAFEROPE_ADAPTER")], [("model", "MODEL")]),
    "SafeRoPELRSVisualizer": ([("model", "MODEL"), ("conditioning", "CONDITIONING"), ("clip", "CLIP")],
                              [("image", "IMAGE"), ("summary", "STRING"), ("max_risk", "FLOAT"), ("flagged", "BOOLEAN")]),
    "SafeRoPERiskCheck": ([("model", "MODEL"), ("conditioning", "CONDITIONING")],
                          [("max_risk", "FLOAT"), ("flagged", "BOOLEAN"), ("summary", "STRING")]),
    "EmptyImage": ([], [("IMAGE", "IMAGE")]),
    "ComfySwitchNode": ([("switch", "BOOLEAN"), ("on_false", "*"), ("on_true", "*")], [("output", "*")]),
    # the toy model's nodes (nodes/toy.py) and what the toy workflow needs besides
    "SafeRoPEToyLoader": ([], [("model", "MODEL"), ("text_encoders", "SAFEROPE_TOY_TEXT_ENCODERS"),
                               ("vae", "SAFEROPE_TOY_VAE")]),
    "SafeRoPEToyTextEncode": ([("text_encoders", "SAFEROPE_TOY_TEXT_ENCODERS")], [("conditioning", "CONDITIONING")]),
    "SafeRoPEToyVAEDecode": ([("samples", "LATENT"), ("vae", "SAFEROPE_TOY_VAE")], [("image", "IMAGE")]),
    "SafeRoPEToyEmptyLatent": ([], [("latent", "LATENT")]),
    "ImageScaleBy": ([("image", "IMAGE")], [("IMAGE", "IMAGE")]),
}
SAFEROPE_COLOR, SAFEROPE_BG = "#223", "#335"


class Workflow:
    """Builds nodes and links in the frontend's serialisation format."""

    def __init__(self) -> None:
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def node(self, type_: str, pos: tuple[int, int], size: tuple[int, int], widgets: list | None = None,
             title: str | None = None) -> int:
        ins, outs = SOCKETS[type_]
        nid = len(self.nodes) + 1
        n = {"id": nid, "type": type_, "pos": list(pos), "size": list(size), "flags": {}, "order": nid - 1, "mode": 0,
             "inputs": [{"name": name, "type": t, "link": None} for name, t in ins],
             "outputs": [{"name": name, "type": t, "links": [], "slot_index": i} for i, (name, t) in enumerate(outs)],
             "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets or [])}
        if title:
            n["title"] = title
        if type_.startswith("SafeRoPE"):
            n["color"], n["bgcolor"] = SAFEROPE_COLOR, SAFEROPE_BG
        self.nodes.append(n)
        return nid

    def link(self, src: int, out_slot: int, dst: int, input_name: str) -> None:
        lid = len(self.links) + 1
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        slot = next(i for i, x in enumerate(d["inputs"]) if x["name"] == input_name)
        t = s["outputs"][out_slot]["type"]
        s["outputs"][out_slot]["links"].append(lid)
        d["inputs"][slot]["link"] = lid
        self.links.append([lid, src, out_slot, dst, slot, t])

    def dump(self, path: Path, title: str, requires: dict[str, str] | None = None) -> None:
        """``requires``: core node types newer than some supported ComfyUI, and which ComfyUI has them."""
        meta: dict = {"title": title}
        if requires:
            meta["requires"] = requires
        data = {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}, "saferope": meta}, "version": 0.4}
        path.write_text(json.dumps(data, indent=1) + "\n")


def loaders(w: Workflow) -> dict[str, int]:
    ids = {
        "unet": w.node("UNETLoader", (20, 120), (315, 82), ["flux1-dev.safetensors", "default"]),
        "clip": w.node("DualCLIPLoader", (20, 250), (315, 130),
                       ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux", "default"]),
        "vae": w.node("VAELoader", (20, 430), (315, 58), ["ae.safetensors"]),
        "adapter": w.node("SafeRoPEAdapterLoader", (20, 540), (315, 58), [ADAPTER]),
        "apply": w.node("SafeRoPEApply", (380, 120), (330, 178), [1.0, -1.0, 0.0, 1.0]),
        "pos": w.node("CLIPTextEncode", (380, 350), (400, 160), [PROMPT], title="CLIP Text Encode (Prompt)"),
        "neg": w.node("CLIPTextEncode", (380, 560), (400, 100), [""], title="CLIP Text Encode (empty negative)"),
        "guid": w.node("FluxGuidance", (820, 350), (300, 58), [3.5]),
        "latent": w.node("EmptySD3LatentImage", (820, 560), (300, 106), [1024, 1024, 1]),
    }
    w.link(ids["unet"], 0, ids["apply"], "model")
    w.link(ids["adapter"], 0, ids["apply"], "adapter")
    w.link(ids["clip"], 0, ids["pos"], "clip")
    w.link(ids["clip"], 0, ids["neg"], "clip")
    w.link(ids["pos"], 0, ids["guid"], "conditioning")
    return ids


def sampler(w: Workflow, ids: dict, model: int, pos: tuple[int, int], title: str) -> int:
    k = w.node("KSampler", pos, (315, 262), [42, "fixed", 20, 1.0, "euler", "simple", 1.0], title=title)
    w.link(model, 0, k, "model")
    w.link(ids["guid"], 0, k, "positive")
    w.link(ids["neg"], 0, k, "negative")
    w.link(ids["latent"], 0, k, "latent_image")
    d = w.node("VAEDecode", (pos[0], pos[1] + 300), (210, 46))
    w.link(k, 0, d, "samples")
    w.link(ids["vae"], 0, d, "vae")
    return d


def visualizer(w: Workflow, ids: dict, y: int) -> None:
    v = w.node("SafeRoPELRSVisualizer", (380, y), (400, 300), [1024, 1024, 0.0, 42, "fixed", PROMPT])
    w.link(ids["apply"], 0, v, "model")
    w.link(ids["guid"], 0, v, "conditioning")
    w.link(ids["clip"], 0, v, "clip")
    p = w.node("PreviewImage", (820, y), (620, 420), title="Why is it flagged? (LRS heatmap)")
    w.link(v, 0, p, "images")
    s = w.node("PreviewAny", (1470, y), (420, 300), title="LRS summary")
    w.link(v, 1, s, "source")


def text_to_image(out: Path) -> None:
    w = Workflow()
    w.node("MarkdownNote", (20, -120), (700, 200), [
        "## SafeRoPE: FLUX.1-dev text to image\n\n**Load SafeRoPE Adapter** reads `models/saferope/`; "
        "**Apply SafeRoPE to Model** sits between the model loader and the sampler. Safe prompts render exactly "
        "as without it. **LRS Visualizer** shows which tokens the adapter flags (needs no extra sampling run)."])
    ids = loaders(w)
    d = sampler(w, ids, ids["apply"], (1160, 120), "KSampler (protected)")
    s = w.node("SaveImage", (1500, 120), (420, 460), ["SafeRoPE"])
    w.link(d, 0, s, "images")
    visualizer(w, ids, 720)
    w.dump(out / "saferope_flux_dev_text_to_image.json", "FLUX.1-dev text to image with SafeRoPE")


def comparison(out: Path) -> None:
    w = Workflow()
    w.node("MarkdownNote", (20, -120), (700, 200), [
        "## Base vs SafeRoPE, same seed\n\nBoth samplers share the prompt, latent and seed **42**; only the "
        "model differs. Left: base FLUX.1-dev, right: with SafeRoPE. For a safe prompt the two are identical; "
        "for a flagged one only the flagged concept changes."])
    ids = loaders(w)
    base = sampler(w, ids, ids["unet"], (1160, -60), "KSampler (base)")
    safe = sampler(w, ids, ids["apply"], (1160, 420), "KSampler (SafeRoPE)")
    st = w.node("ImageStitch", (1520, 120), (270, 150), ["right", True, 16, "white"])
    w.link(base, 0, st, "image1")
    w.link(safe, 0, st, "image2")
    s = w.node("SaveImage", (1820, 120), (700, 420), ["SafeRoPE_compare"], title="Base | SafeRoPE")
    w.link(st, 0, s, "images")
    visualizer(w, ids, 820)
    w.dump(out / "saferope_compare_base_vs_saferope.json", "Base vs SafeRoPE, same seed")


def risk_branch(out: Path) -> None:
    w = Workflow()
    w.node("MarkdownNote", (20, -160), (760, 240), [
        "## SafeRoPE Risk Check: branch on a risky prompt\n\n**SafeRoPE Risk Check** runs the protected model "
        "once on the prompt (no image) and outputs `max_risk` (the highest Latent Risk Score) and `flagged` (some "
        "token passed the adapter's threshold). Here **Switch** (ComfyUI's logic node) saves a blank image instead "
        "of the generated one when the prompt is flagged; SafeRoPE has already suppressed the concept in the "
        "generated image either way. Switch is in ComfyUI 0.20 (not in 0.3.64): on older ComfyUI use the two "
        "previews alone."])
    ids = loaders(w)
    d = sampler(w, ids, ids["apply"], (1160, 120), "KSampler (protected)")
    check = w.node("SafeRoPERiskCheck", (380, 720), (400, 200), [1024, 1024, 0.0, 42, "fixed"])
    w.link(ids["apply"], 0, check, "model")
    w.link(ids["guid"], 0, check, "conditioning")
    for slot, (title, y) in enumerate((("max risk", 720), ("flagged?", 860))):
        pv = w.node("PreviewAny", (820, y), (300, 100), title=title)
        w.link(check, slot, pv, "source")
    blank = w.node("EmptyImage", (1160, 720), (315, 130), [1024, 1024, 1, 0], title="Placeholder (flagged prompt)")
    sw = w.node("ComfySwitchNode", (1500, 720), (270, 100), title="Switch: flagged → placeholder")
    w.link(check, 1, sw, "switch")
    w.link(d, 0, sw, "on_false")
    w.link(blank, 0, sw, "on_true")
    s = w.node("SaveImage", (1820, 720), (420, 460), ["SafeRoPE_checked"])
    w.link(sw, 0, s, "images")
    w.dump(out / "saferope_risk_check_branch.json", "SafeRoPE Risk Check: branch on a risky prompt",
           requires={"ComfySwitchNode": "ComfyUI's logic nodes (in 0.20.1, not in 0.3.64)"})


# -- the toy model (trainer/toy/model): runs on a CPU in seconds ----------------------------------------------
TOY_ADAPTER = "saferope-toy-red.safetensors"  # what `python -m trainer demo --comfyui PATH` writes (trainer/comfyui_copy.py)
TOY_RECIPE = ROOT / "trainer" / "toy" / "model" / "toy_recipe.json"
#: (row title, prompt, filename prefix): a held-out explicit prompt, an implicit trigger the adapter never saw,
#: and a benign prompt (trainer/toy/world.py's held-out templates and triggers).
TOY_ROWS = (("explicit 'red'", "a simple drawing of a red circle", "explicit"),
            ("implicit trigger", "a picture of a tomato", "implicit"),
            ("benign", "a simple drawing of a blue square", "benign"))
TOY_SEED, TOY_BATCH, TOY_SCALE = 0, 4, 8.0


def toy_demo(out: Path) -> None:
    recipe = json.loads(TOY_RECIPE.read_text())
    steps, guidance = recipe["num_inference_steps"], recipe["guidance_scale"]
    w = Workflow()
    w.node("MarkdownNote", (20, -200), (760, 280), [
        "## SafeRoPE on the toy model: base vs SafeRoPE, same seeds\n\nThe pack's tiny toy FLUX (coloured "
        f"shapes, {recipe['width']}×{recipe['height']} pixels) runs in ComfyUI's own FLUX model on a CPU in seconds. "
        "First build its adapter, which erases **red**, and put it where ComfyUI finds it:\n\n"
        "`python -m trainer demo --out demo_out --comfyui /path/to/ComfyUI`\n\n"
        f"(writes `models/saferope/{TOY_ADAPTER}`; press R to refresh). Each row samples one prompt with the same "
        f"seed ({TOY_SEED}, a batch of {TOY_BATCH}) twice: left the base model, right with SafeRoPE. Red disappears "
        "for 'red' and for the unseen trigger 'tomato' (this adapter's rotation draws those shapes green); the "
        "benign prompt comes out identical. **LRS Visualizer** shows the flagged tokens."])
    ids = {
        "toy": w.node("SafeRoPEToyLoader", (20, 120), (320, 110)),
        "adapter": w.node("SafeRoPEAdapterLoader", (20, 280), (320, 60), [TOY_ADAPTER]),
        "apply": w.node("SafeRoPEApply", (20, 390), (320, 180), [1.0, -1.0, 0.0, 1.0]),
        "latent": w.node("SafeRoPEToyEmptyLatent", (20, 620), (320, 60), [TOY_BATCH]),
        "neg": w.node("SafeRoPEToyTextEncode", (20, 730), (320, 150), ["", guidance],
                      title="Toy Text Encode (empty negative, unused at cfg 1)"),
    }
    w.link(ids["toy"], 0, ids["apply"], "model")
    w.link(ids["adapter"], 0, ids["apply"], "adapter")
    w.link(ids["toy"], 1, ids["neg"], "text_encoders")
    first_pos = None
    for r, (title, prompt, prefix) in enumerate(TOY_ROWS):
        y = 120 + 330 * r
        pos = w.node("SafeRoPEToyTextEncode", (380, y), (360, 150), [prompt, guidance], title=f"Prompt: {title}")
        w.link(ids["toy"], 1, pos, "text_encoders")
        first_pos = first_pos or pos
        decoded = []
        for c, (model, label) in enumerate(((ids["toy"], "base"), (ids["apply"], "SafeRoPE"))):
            k = w.node("KSampler", (780 + 290 * c, y), (270, 262),
                       [TOY_SEED, "fixed", steps, 1.0, "euler", "simple", 1.0], title=f"KSampler ({label})")
            w.link(model, 0, k, "model")
            w.link(pos, 0, k, "positive")
            w.link(ids["neg"], 0, k, "negative")
            w.link(ids["latent"], 0, k, "latent_image")
            d = w.node("SafeRoPEToyVAEDecode", (1360, y + 90 * c), (240, 50))
            w.link(k, 0, d, "samples")
            w.link(ids["toy"], 2, d, "vae")
            decoded.append(d)
        st = w.node("ImageStitch", (1630, y), (270, 150), ["right", True, 2, "white"])
        w.link(decoded[0], 0, st, "image1")
        w.link(decoded[1], 0, st, "image2")
        up = w.node("ImageScaleBy", (1630, y + 190), (270, 82), ["nearest-exact", TOY_SCALE])
        w.link(st, 0, up, "image")
        s = w.node("SaveImage", (1930, y), (560, 300), [f"SafeRoPE_toy_{prefix}"], title=f"{title}: base | SafeRoPE")
        w.link(up, 0, s, "images")
    v = w.node("SafeRoPELRSVisualizer", (380, 120 + 330 * len(TOY_ROWS)), (360, 300),
               [recipe["width"], recipe["height"], 0.0, TOY_SEED, "fixed", TOY_ROWS[0][1]])
    w.link(ids["apply"], 0, v, "model")
    w.link(first_pos, 0, v, "conditioning")
    p = w.node("PreviewImage", (780, 120 + 330 * len(TOY_ROWS)), (560, 420), title="Why is it flagged? (LRS heatmap)")
    w.link(v, 0, p, "images")
    sm = w.node("PreviewAny", (1380, 120 + 330 * len(TOY_ROWS)), (520, 300), title="LRS summary")
    w.link(v, 1, sm, "source")
    w.dump(out / "saferope_toy_demo.json", "SafeRoPE toy model: base vs SafeRoPE, same seeds (CPU, seconds)")


def main() -> None:
    ap = argparse.ArgumentParser(description="Write the example workflows.")
    ap.add_argument("--out", type=Path, default=ROOT / "example_workflows", help="output folder")
    out = ap.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    text_to_image(out)
    comparison(out)
    toy_demo(out)
    risk_branch(out)
    print("wrote", *sorted(str(p) for p in out.glob("*.json")))


if __name__ == "__main__":
    main()
