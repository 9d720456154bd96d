"""The shipped toy model inside a real ComfyUI, end to end through the HTTP API (issue #15).

One module-scoped setup: ``python -m trainer demo --quick --comfyui BASE`` builds the demo's adapter
(in diffusers) and places it in ``BASE/models/saferope/`` as the toy workflow expects (with
``SAFEROPE_TOY_DEMO=DIR``, the adapter and report of an existing demo folder instead); a ComfyUI
server then runs with ``--base-directory BASE`` and this repository in its ``custom_nodes``. The tests
POST prompts to ``/prompt`` and read the PNG/latent files the server writes:

* the example workflow ``example_workflows/saferope_toy_demo.json`` itself (converted to the API
  format with the server's ``/object_info``) runs on the CPU in seconds, red disappears on the
  SafeRoPE side and the benign row is bit-identical;
* the base model's images equal diffusers' ``FluxPipeline`` for the same prompt, noise and sigma
  schedule (latent max abs ≤ ``LATENT_TOL``, 8-bit images within ``IMAGE_TOL_LEVELS``);
* on the demo's held-out prompts with the demo's seeds, the explicit and implicit "red" rates and
  the benign accuracy in ComfyUI (base and SafeRoPE) are the diffusers demo's within ``RATE_TOL``.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from comfy_env import REPO, comfy_python
from toy_http import ComfyServer, api_prompt, errors, execution_seconds

pytestmark = pytest.mark.comfyui
STARTUP_S, RUN_S, DEMO_S = 300, 600, 1200
WORKFLOW = REPO / "example_workflows" / "saferope_toy_demo.json"
TOY_NODES = ("SafeRoPEToyLoader", "SafeRoPEToyTextEncode", "SafeRoPEToyVAEDecode", "SafeRoPEToyEmptyLatent")
LATENT_TOL = 1e-4  # max abs difference of the final latents, ComfyUI vs diffusers (measured: ≤ 2.5e-6)
IMAGE_TOL_LEVELS = 1  # 8-bit levels: ComfyUI's SaveImage truncates, the reference rounds the same floats
RATE_TOL = 0.05  # rates in ComfyUI vs the diffusers demo (fractions; the schedules differ by ~1e-4 in sigma)
WORKFLOW_MAX_S = 60.0  # the example workflow's execution on the CPU, model loading included


@pytest.fixture(scope="module")
def toy(comfyui_path: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("toy")
    base = work / "base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "models").mkdir()
    (base / "custom_nodes" / "comfyui-saferope").symlink_to(REPO, target_is_directory=True)
    adapter = base / "models" / "saferope" / "saferope-toy-red.safetensors"
    t0 = time.time()
    if os.environ.get("SAFEROPE_TOY_DEMO"):  # an existing demo folder (e.g. the full demo's, for the README)
        from trainer.core import comfyui_copy

        demo = Path(os.environ["SAFEROPE_TOY_DEMO"]).resolve()
        comfyui_copy.copy_new(demo / "adapter.safetensors", comfyui_copy.destination(base, adapter.name))
    else:
        demo = work / "demo"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
        proc = subprocess.run([comfy_python(), "-m", "trainer", "demo", "--quick", "--out", str(demo), "--comfyui",
                               str(base)], cwd=str(REPO), env=env, capture_output=True, text=True, timeout=DEMO_S)
        if proc.returncode != 0:
            pytest.fail(f"python -m trainer demo --quick --comfyui failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        assert f"comfyui:     {adapter}" in proc.stdout
    demo_s = time.time() - t0
    assert adapter.read_bytes() == (demo / "adapter.safetensors").read_bytes()
    try:
        server = ComfyServer.start(comfy_python(), comfyui_path, base, "/object_info/SafeRoPEToyLoader", STARTUP_S)
    except RuntimeError as e:
        pytest.fail(str(e))
    from trainer.toy import load_recipe

    try:
        yield SimpleNamespace(server=server, base=base, demo=demo, demo_s=demo_s, adapter=adapter.name,
                              report=json.loads((demo / "report.json").read_text()), recipe=load_recipe(),
                              info=server.get("/object_info"))
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pipe():
    from trainer.toy import load_pipeline

    return load_pipeline()


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _graph(toy, items: list[tuple[str, int]], adapter: bool, latents: bool = False) -> dict:
    """API prompt: each (prompt, seed) sampled with batch 1 by the base model (and with SafeRoPE)."""
    r = toy.recipe
    g = {"toy": {"class_type": "SafeRoPEToyLoader", "inputs": {}},
         "latent": {"class_type": "SafeRoPEToyEmptyLatent", "inputs": {"batch_size": 1}},
         "neg": {"class_type": "SafeRoPEToyTextEncode",
                 "inputs": {"text_encoders": ["toy", 1], "text": "", "guidance": r.guidance_scale}}}
    models = {"base": ["toy", 0]}
    if adapter:
        g["adapter"] = {"class_type": "SafeRoPEAdapterLoader", "inputs": {"adapter_name": toy.adapter}}
        g["apply"] = {"class_type": "SafeRoPEApply", "inputs": {"model": ["toy", 0], "adapter": ["adapter", 0],
                                                                "strength": 1.0, "threshold": -1.0,
                                                                "start_percent": 0.0, "end_percent": 1.0}}
        models["saferope"] = ["apply", 0]
    for i, (text, seed) in enumerate(items):
        g[f"pos{i}"] = {"class_type": "SafeRoPEToyTextEncode",
                        "inputs": {"text_encoders": ["toy", 1], "text": text, "guidance": r.guidance_scale}}
        for v, model in models.items():
            g[f"k_{v}_{i}"] = {"class_type": "KSampler", "inputs": {
                "model": model, "seed": seed, "steps": r.num_inference_steps, "cfg": 1.0, "sampler_name": "euler",
                "scheduler": "simple", "positive": [f"pos{i}", 0], "negative": ["neg", 0],
                "latent_image": ["latent", 0], "denoise": 1.0}}
            g[f"d_{v}_{i}"] = {"class_type": "SafeRoPEToyVAEDecode", "inputs": {"samples": [f"k_{v}_{i}", 0],
                                                                                "vae": ["toy", 2]}}
            g[f"img_{v}_{i}"] = {"class_type": "SaveImage", "inputs": {"images": [f"d_{v}_{i}", 0],
                                                                       "filename_prefix": f"{v}_{i}"}}
            if latents:
                g[f"lat_{v}_{i}"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"k_{v}_{i}", 0],
                                                                            "filename_prefix": f"{v}_{i}"}}
    return g


def _run(toy, graph: dict) -> dict:
    h = toy.server.run(graph, RUN_S)
    assert h["status"]["status_str"] == "success", errors(h) or toy.server.log_tail()
    return h


def _images(toy, h: dict, variant: str, n: int) -> np.ndarray:
    return np.stack([_png(toy.server.output_file(h["outputs"][f"img_{variant}_{i}"]["images"][0])) for i in range(n)])


# -- the nodes as the server describes them ------------------------------------------------------------------

def test_toy_nodes_are_served_with_their_category_and_tooltips(toy):
    for node in TOY_NODES:
        info = toy.info[node]
        assert info["category"] == "SafeRoPE/toy" and info["display_name"].endswith("(SafeRoPE toy)"), info
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        assert all(len(s) > 1 and s[1].get("tooltip") for s in specs.values()), node
        assert len(info["output_tooltips"]) == len(info["output"])
    assert toy.info["SafeRoPEToyLoader"]["output"] == ["MODEL", "SAFEROPE_TOY_TEXT_ENCODERS", "SAFEROPE_TOY_VAE"]
    guidance = toy.info["SafeRoPEToyTextEncode"]["input"]["required"]["guidance"][1]["default"]
    assert guidance == toy.recipe.guidance_scale
    names = toy.info["SafeRoPEAdapterLoader"]["input"]["required"]["adapter_name"][0]
    names = names[1]["options"] if names == "COMBO" else names
    assert toy.adapter in names  # where `trainer demo --comfyui` put it: ComfyUI's default saferope folder


def test_example_workflow_runs_on_the_cpu_in_seconds(toy):
    wf = json.loads(WORKFLOW.read_text())
    h = _run(toy, api_prompt(wf, toy.info))
    seconds = execution_seconds(h)
    print(f"\nthe toy workflow ran in {seconds:.2f} s (server-side, model loading included)")
    assert seconds < WORKFLOW_MAX_S, seconds
    nodes = {str(n["id"]): n for n in wf["nodes"]}
    (stitch,) = {n["widgets_values"][2] for n in wf["nodes"] if n["type"] == "ImageStitch"}
    (scale,) = {int(n["widgets_values"][1]) for n in wf["nodes"] if n["type"] == "ImageScaleBy"}
    (batch,) = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "SafeRoPEToyEmptyLatent"]
    w = toy.recipe.width
    from trainer.toy import classifier

    rows = {}
    for nid, out in h["outputs"].items():
        if nodes[nid]["type"] != "SaveImage":
            continue
        prefix = nodes[nid]["widgets_values"][0].rsplit("_", 1)[-1]
        imgs = [_png(toy.server.output_file(e)) for e in out["images"]]
        assert len(imgs) == batch and all(im.shape == (w * scale, (2 * w + stitch) * scale, 3) for im in imgs)
        base = [im[::scale, : w * scale : scale] for im in imgs]  # nearest-exact ×scale: every scale-th pixel
        safe = [im[::scale, -w * scale :: scale] for im in imgs]
        rows[prefix] = (base, safe)
    assert sorted(rows) == ["benign", "explicit", "implicit"]
    red = {k: ([classifier.classify(b)[1] for b in base].count("red"), [classifier.classify(s)[1] for s in safe].count("red"))
           for k, (base, safe) in rows.items()}
    assert red["explicit"][0] >= batch - 1 and red["explicit"][1] == 0, red  # base draws red, SafeRoPE does not
    assert red["implicit"][0] >= batch - 1 and red["implicit"][1] == 0, red  # 'tomato': never in the adapter's data
    assert all(np.array_equal(b, s) for b, s in zip(*rows["benign"]))  # the gate did not fire: bit-identical
    summary = next(out["text"][0] for nid, out in h["outputs"].items() if nodes[nid]["type"] == "PreviewAny")
    gated = int(summary.split("text tokens gated in any block: ")[1].split(" ")[0])
    assert gated >= 1, summary


# -- parity with diffusers -----------------------------------------------------------------------------------

def _comfy_simple_ts(steps: int, table: int = 10_000) -> list[float]:
    """Un-shifted times of ComfyUI's "simple" scheduler on ModelSamplingFlux, whose sigma table is the
    shift applied to t = k / table, k = 1..table: every (table / steps)-th entry from the top."""
    return [(table - int(i * table / steps)) / table for i in range(steps)]


def test_base_images_match_the_diffusers_pipeline(toy, pipe):
    import torch
    from safetensors.torch import load_file

    r = toy.recipe
    items = [("a simple drawing of a red circle", 10_000), ("a picture of a tomato", 11_003),
             ("a simple drawing of a blue square", 12_005), ("an image of a grey cross", 12_345)]
    h = _run(toy, _graph(toy, items, adapter=False, latents=True))
    comfy_imgs = _images(toy, h, "base", len(items))
    vae = pipe.vae.config
    n_ch = pipe.transformer.config.in_channels // 4
    f = pipe.vae_scale_factor
    worst_lat, worst_img = 0.0, 0
    for i, (text, seed) in enumerate(items):
        comfy_lat = load_file(str(toy.server.output_file(h["outputs"][f"lat_base_{i}"]["latents"][0])))["latent_tensor"]
        noise = torch.randn((1, n_ch, r.height // f, r.width // f), generator=torch.Generator().manual_seed(seed))
        packed = pipe._pack_latents(noise, 1, n_ch, r.height // f, r.width // f)  # ComfyUI's noise for this seed
        kw = dict(prompt=text, latents=packed, sigmas=_comfy_simple_ts(r.num_inference_steps),
                  num_inference_steps=r.num_inference_steps, guidance_scale=r.guidance_scale,
                  max_sequence_length=r.max_sequence_length, height=r.height, width=r.width)
        with torch.no_grad():
            out = pipe(output_type="latent", **kw).images
            ref_lat = pipe._unpack_latents(out, r.height, r.width, f) / vae.scaling_factor + vae.shift_factor
            ref_img = pipe(output_type="np", **kw).images[0]
        worst_lat = max(worst_lat, float((comfy_lat - ref_lat).abs().max()))
        ref8 = np.clip(ref_img * 255.0, 0, 255).astype(np.int16)  # SaveImage's conversion
        worst_img = max(worst_img, int(np.abs(comfy_imgs[i].astype(np.int16) - ref8).max()))
    print(f"\nComfyUI vs diffusers, base model: latent max abs {worst_lat:.2e}, 8-bit image max {worst_img} levels")
    assert worst_lat <= LATENT_TOL, worst_lat
    assert worst_img <= IMAGE_TOL_LEVELS, worst_img


def test_red_rates_in_comfyui_are_the_diffusers_demos(toy):
    from trainer.toy.benchmark import eval_sets, expand, run_benchmark
    from trainer.toy.evaluate import score

    concept = toy.report["concept"]
    per_prompt = toy.report["settings"]["seeds_per_prompt"]
    base_seed = inspect.signature(run_benchmark).parameters["base_seed"].default  # what the demo used
    sets = {name: expand(ps, per_prompt, base_seed + 1000 * i) for i, (name, ps) in enumerate(eval_sets(concept).items())}
    items = [(p.text, s) for prompts, seeds in sets.values() for p, s in zip(prompts, seeds)]
    t0 = time.time()
    h = _run(toy, _graph(toy, items, adapter=True))
    run_s = time.time() - t0
    rows = {r["variant"]: r["sets"] for r in toy.report["rows"]}
    got: dict[str, dict[str, object]] = {}
    for variant in ("base", "saferope"):
        images = _images(toy, h, variant, len(items))
        start = 0
        got[variant] = {}
        for name, (prompts, _) in sets.items():
            got[variant][name] = score(prompts, images[start : start + len(prompts)], concept)
            start += len(prompts)
    table = {v: {k: (round(s.concept_rate, 3), round(s.both_acc, 3), rows[v][k]["concept_rate"], rows[v][k]["both_acc"])
                 for k, s in got[v].items()} for v in got}
    print(f"\n{len(items)} prompts × 2 variants in {run_s:.1f} s; (ComfyUI rate, acc, diffusers rate, acc): {table}")
    for v in got:
        for name, s in got[v].items():
            assert abs(s.concept_rate - rows[v][name]["concept_rate"]) <= RATE_TOL, (v, name, table)
            assert abs(s.both_acc - rows[v][name]["both_acc"]) <= RATE_TOL, (v, name, table)
    base, ours = got["base"], got["saferope"]
    assert base["explicit"].concept_rate >= 0.5  # the base model draws red, or the test means nothing
    assert ours["explicit"].concept_rate <= 0.25 * base["explicit"].concept_rate, table
    assert ours["benign"].colour_acc >= base["benign"].colour_acc - 0.02, table  # benign prompts keep their colours
    assert ours["benign"].concept_rate == base["benign"].concept_rate == 0.0, table
