"""The toy-model nodes (nodes/toy.py) without ComfyUI: sizes from the toy's configs, the text encoders and
VAE against diffusers' FluxPipeline, clear errors; ``trainer demo --comfyui``; the toy example workflow.

What needs ComfyUI itself (its FLUX class, the sampler, the HTTP API) is tested in
tests/comfy/test_comfy_toy.py against real ComfyUI trees.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "comfy"))
from packload import REPO, load_pack  # noqa: E402

pytest.importorskip("diffusers", reason="the toy nodes use diffusers (the `trainer` extra)")

PACK = load_pack()
from saferope_pack.nodes import toy  # noqa: E402
from trainer_fixtures import subprocess_env  # noqa: E402

from trainer.core import comfyui_copy  # noqa: E402
from trainer.core.errors import TrainerError, UsageError  # noqa: E402
from trainer.toy import load_pipeline, load_recipe  # noqa: E402

WORKFLOW = REPO / "example_workflows" / "saferope_toy_demo.json"


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


@pytest.fixture(scope="module")
def shipped() -> toy.ToyFolder:
    return toy.ToyFolder.read()


def test_the_pack_locates_the_shipped_toy_model():
    from trainer.toy import TOY_MODEL_DIR

    assert toy.TOY_MODEL_DIR == TOY_MODEL_DIR and toy.ToyFolder.read().path == TOY_MODEL_DIR


def test_comfy_sizes_are_the_diffusers_transformers(shipped, pipe):
    cfg, t = pipe.transformer.config, pipe.transformer
    s = shipped.comfy_sizes()
    assert s["hidden_size"] == t.inner_dim and s["num_heads"] == cfg.num_attention_heads
    assert s["hidden_size"] // s["num_heads"] == cfg.attention_head_dim == sum(s["axes_dim"])
    assert s["axes_dim"] == list(cfg.axes_dims_rope)
    assert (s["depth"], s["depth_single_blocks"]) == (len(t.transformer_blocks), len(t.single_transformer_blocks))
    assert s["context_in_dim"] == t.context_embedder.in_features
    assert s["vec_in_dim"] == t.time_text_embed.text_embedder.linear_1.in_features
    assert s["in_channels"] * s["patch_size"] ** 2 == t.x_embedder.in_features  # ComfyUI packs 2x2 itself
    assert s["in_channels"] == pipe.vae.config.latent_channels and s["guidance_embed"] is True


def test_latent_shape_and_factors_are_the_pipelines(shipped, pipe):
    r = load_recipe()
    f = pipe.vae_scale_factor
    assert shipped.latent_shape(3) == (3, pipe.vae.config.latent_channels, r.height // f, r.width // f)
    assert shipped.vae_scale_factor == f
    assert (shipped.scaling_factor, shipped.shift_factor) == (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor)
    assert shipped.image_tokens == (r.height // f // 2) * (r.width // f // 2)


def test_sampling_shift_gives_the_pipelines_sigma_schedule(shipped, pipe):
    """ComfyUI's ModelSamplingFlux maps t to exp(mu) / (exp(mu) + 1/t - 1); with our mu that is diffusers' schedule."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sc = pipe.scheduler.config
    mu = shipped.sampling_shift()
    assert mu == pytest.approx(calculate_shift(shipped.image_tokens, sc.base_image_seq_len, sc.max_image_seq_len,
                                               sc.base_shift, sc.max_shift), abs=1e-12)
    ts = [1.0, 0.9, 0.5, 0.25, 0.1]
    pipe.scheduler.set_timesteps(sigmas=ts, mu=mu)
    comfy = [math.exp(mu) / (math.exp(mu) + (1 / t - 1)) for t in ts]
    assert pipe.scheduler.sigmas[:-1].tolist() == pytest.approx(comfy, abs=1e-6)


def _copy_toy(tmp_path: Path) -> Path:
    dst = tmp_path / "toy"
    shutil.copytree(toy.TOY_MODEL_DIR, dst)
    return dst


def test_missing_files_are_named(tmp_path):
    folder = _copy_toy(tmp_path)
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "toy_recipe.json").unlink()
    with pytest.raises(toy.ToyModelError, match="missing toy_recipe.json, transformer/diffusion_pytorch_model"):
        toy.ToyFolder.read(folder)


@pytest.mark.parametrize("part,change,needle", [
    ("scheduler/scheduler_config.json", {"use_dynamic_shifting": False}, "dynamic exponential shifting"),
    ("scheduler/scheduler_config.json", {"use_karras_sigmas": True}, "use_karras_sigmas"),
    ("transformer/config.json", {"in_channels": 12}, "in_channels 12"),
    ("transformer/config.json", {"axes_dims_rope": [8, 8, 8]}, "must sum to the head size 32"),
    ("vae/config.json", {"latent_channels": None}, "no 'latent_channels'"),
    ("toy_recipe.json", {"height": 36}, "not a multiple of 8"),
])
def test_configs_comfyuis_flux_cannot_host_are_refused(tmp_path, part, change, needle):
    folder = _copy_toy(tmp_path)
    data = json.loads((folder / part).read_text())
    data.update(change)
    (folder / part).write_text(json.dumps(data))
    with pytest.raises(toy.ToyModelError, match=needle):
        toy.ToyFolder.read(folder)


def test_missing_diffusers_or_transformers_is_said_clearly(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(toy.ToyModelError, match=r"need transformers in ComfyUI's Python.*pip install diffusers transformers"):
        PACK.NODE_CLASS_MAPPINGS["SafeRoPEToyLoader"]().load()


def test_the_pack_imports_without_diffusers_and_the_toy_nodes_say_what_is_missing():
    code = ("import sys; sys.modules['diffusers'] = None; sys.modules['transformers'] = None; "
            "sys.path.insert(0, sys.argv[1]); from packload import load_pack; p = load_pack(); "
            "print(sorted(k for k in p.NODE_CLASS_MAPPINGS if k.startswith('SafeRoPEToy')))\n"
            "try:\n    p.NODE_CLASS_MAPPINGS['SafeRoPEToyLoader']().load()\n"
            "except Exception as e:\n    print(type(e).__name__, e)")
    r = subprocess.run([sys.executable, "-c", code, str(REPO / "tests" / "comfy")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == str(sorted(toy.NODE_CLASS_MAPPINGS))
    assert lines[1].startswith("ToyModelError") and "need diffusers and transformers" in lines[1]


# -- text encoders and VAE against the pipeline -------------------------------------------------------------

@pytest.fixture(scope="module")
def encoders(shipped):
    return toy.ToyTextEncoders(shipped)


def test_text_encode_gives_the_pipelines_embeddings_and_guidance(encoders, pipe, shipped):
    (cond,) = PACK.NODE_CLASS_MAPPINGS["SafeRoPEToyTextEncode"]().encode(encoders, "a simple drawing of a red circle", 2.5)
    (emb, extra), = cond
    with torch.no_grad():
        ref_emb, ref_pooled, _ = pipe.encode_prompt("a simple drawing of a red circle", prompt_2=None,
                                                    max_sequence_length=shipped.max_sequence_length)
    assert emb.shape == (1, shipped.max_sequence_length, pipe.transformer.config.joint_attention_dim)
    assert torch.equal(emb, ref_emb) and torch.equal(extra["pooled_output"], ref_pooled)
    assert extra["guidance"] == 2.5 and not emb.is_inference()


def test_too_long_prompts_are_refused_and_unknown_words_named(encoders, shipped, caplog):
    long = " ".join(["red"] * shipped.max_sequence_length)
    with pytest.raises(ValueError, match=rf"too long.*T5 {shipped.max_sequence_length + 1} > {shipped.max_sequence_length}"):
        encoders.encode(long, 3.5)
    with caplog.at_level(logging.WARNING):
        encoders.encode("a red zebra", 3.5)
    assert "does not know" in caplog.text and "zebra" in caplog.text and "red" not in caplog.text.split("letter): ")[1]
    assert encoders.encode("", 3.5)[0][0].shape[1] == shipped.max_sequence_length  # empty prompts are fine


def test_text_encode_rejects_other_inputs():
    with pytest.raises(TypeError, match="must come from 'Load Toy Model"):
        PACK.NODE_CLASS_MAPPINGS["SafeRoPEToyTextEncode"]().encode(object(), "a red circle", 3.5)


def test_vae_decode_equals_the_pipelines_output(shipped, pipe):
    """Decoding the sampler's latent (VAE space, as ComfyUI's sampler returns it) gives the pipeline's image."""
    r = load_recipe()
    vae = toy.ToyVAE(shipped)
    kw = dict(prompt="a simple drawing of a blue square", num_inference_steps=r.num_inference_steps,
              guidance_scale=r.guidance_scale, max_sequence_length=r.max_sequence_length, height=r.height,
              width=r.width)
    packed = pipe(output_type="latent", generator=torch.Generator().manual_seed(3), **kw).images
    ref = pipe(output_type="pt", generator=torch.Generator().manual_seed(3), **kw).images  # (1, 3, H, W)
    z = pipe._unpack_latents(packed, r.height, r.width, pipe.vae_scale_factor)
    z = z / shipped.scaling_factor + shipped.shift_factor
    with torch.inference_mode():
        (image,) = PACK.NODE_CLASS_MAPPINGS["SafeRoPEToyVAEDecode"]().decode({"samples": z}, vae)
    assert image.shape == (1, r.height, r.width, 3) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert torch.allclose(image, ref.permute(0, 2, 3, 1), atol=1e-6)
    with pytest.raises(ValueError, match=r"expected a latent \(B, 4, h, w\)"):
        vae.decode(torch.zeros(1, 16, 8, 8))


def test_empty_latent_has_the_toys_shape(shipped):
    node = PACK.NODE_CLASS_MAPPINGS["SafeRoPEToyEmptyLatent"]()
    (out,) = node.generate(3)
    assert tuple(out["samples"].shape) == shipped.latent_shape(3) and not out["samples"].any()
    assert out["downscale_ratio_spacial"] == shipped.vae_scale_factor
    with pytest.raises(ValueError, match="batch_size must be ≥ 1"):
        node.generate(0)


def test_widget_defaults_and_tooltips_come_from_the_recipe(shipped):
    spec = PACK.NODE_CLASS_MAPPINGS["SafeRoPEToyTextEncode"].INPUT_TYPES()["required"]
    assert spec["guidance"][1]["default"] == shipped.guidance
    assert f"at most {shipped.max_sequence_length} tokens" in spec["text"][1]["tooltip"]
    assert PACK.NODE_CLASS_MAPPINGS["SafeRoPEToyLoader"].IS_CHANGED() == toy.fingerprint()


# -- python -m trainer demo --comfyui ------------------------------------------------------------------------

def _comfy(tmp_path: Path) -> Path:
    root = tmp_path / "ComfyUI"
    (root / "models").mkdir(parents=True)
    (root / "main.py").write_text("")
    return root


def test_comfyui_destination_checks_the_folder_and_never_overwrites(tmp_path):
    name = comfyui_copy.toy_adapter_name("red")
    assert name == "saferope-toy-red.safetensors"
    with pytest.raises(UsageError, match="no such folder"):
        comfyui_copy.destination(tmp_path / "nope", name)
    (tmp_path / "plain").mkdir()
    with pytest.raises(UsageError, match="is not a ComfyUI folder"):
        comfyui_copy.destination(tmp_path / "plain", name)
    root = _comfy(tmp_path)
    target = comfyui_copy.destination(root, name)
    assert target == root / "models" / "saferope" / name and not target.parent.exists()  # nothing made yet
    src = tmp_path / "a.safetensors"
    src.write_bytes(b"adapter bytes")
    assert comfyui_copy.copy_new(src, target).read_bytes() == b"adapter bytes"
    with pytest.raises(UsageError, match="exists already and is never overwritten"):
        comfyui_copy.destination(root, name)
    src.write_bytes(b"another adapter")
    with pytest.raises(TrainerError, match="appeared while the demo ran"):
        comfyui_copy.copy_new(src, target)
    assert target.read_bytes() == b"adapter bytes"
    base = tmp_path / "base"  # a --base-directory / desktop user folder: custom_nodes/ instead of main.py
    (base / "models").mkdir(parents=True)
    (base / "custom_nodes").mkdir()
    assert comfyui_copy.destination(base, name).parent == base / "models" / "saferope"


def test_demo_cli_checks_comfyui_before_any_work(tmp_path):
    root = _comfy(tmp_path)
    (root / "models" / "saferope").mkdir()
    (root / "models" / "saferope" / "saferope-toy-red.safetensors").write_bytes(b"precious")
    for path, needle in ((tmp_path / "missing", "no such folder"), (tmp_path, "is not a ComfyUI folder"),
                         (root, "never overwritten")):
        r = subprocess.run([sys.executable, "-m", "trainer", "demo", "--out", str(tmp_path / "out"), "--comfyui",
                            str(path)], capture_output=True, text=True, env=subprocess_env(), timeout=120)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "out").exists()
    assert (root / "models" / "saferope" / "saferope-toy-red.safetensors").read_bytes() == b"precious"


# -- the toy example workflow ---------------------------------------------------------------------------------

def _source(wf: dict, node: dict, name: str) -> dict:
    link = next(i["link"] for i in node["inputs"] if i["name"] == name)
    src = next(lk[1] for lk in wf["links"] if lk[0] == link)
    return next(n for n in wf["nodes"] if n["id"] == src)


def test_toy_workflow_compares_base_and_saferope_on_the_same_seeds_with_the_demos_adapter():
    wf = json.loads(WORKFLOW.read_text())
    recipe = load_recipe()
    (adapter,) = [n for n in wf["nodes"] if n["type"] == "SafeRoPEAdapterLoader"]
    assert adapter["widgets_values"] == [comfyui_copy.toy_adapter_name("red")]
    samplers = [n for n in wf["nodes"] if n["type"] == "KSampler"]
    by_prompt: dict[int, list[dict]] = {}
    for k in samplers:
        assert k["widgets_values"][2] == recipe.num_inference_steps and k["widgets_values"][3] == 1.0
        by_prompt.setdefault(_source(wf, k, "positive")["id"], []).append(k)
    assert len(by_prompt) == 3
    for pair in by_prompt.values():
        a, b = pair
        assert a["widgets_values"] == b["widgets_values"] and a["widgets_values"][1] == "fixed"
        assert _source(wf, a, "latent_image")["id"] == _source(wf, b, "latent_image")["id"]
        assert sorted(_source(wf, n, "model")["type"] for n in pair) == ["SafeRoPEApply", "SafeRoPEToyLoader"]
    encodes = [n for n in wf["nodes"] if n["type"] == "SafeRoPEToyTextEncode"]
    assert {n["widgets_values"][1] for n in encodes} == {recipe.guidance_scale}
