"""The trainer on every model family: tiny pipelines of each (``tests/tiny_families.py``), ``build`` end to end.

For each family the folder alone tells the trainer what it is; ``build`` (collect → select → train)
encodes each prompt list once with the family's own text encoders and frees them before the
transformer is loaded; the adapter records the family and its shapes; in the diffusers integration
(``evaluate``, ``generate``) it changes the images of the prompts it gates and leaves the others
bit-identical; a model of another family refuses it. Gradient checkpointing, mixed precision and
a 2-process ``accelerate launch`` run on families other than FLUX.1 as well.
"""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_families import CASES, TinyCase
from trainer_fixtures import EVAL_SAFE, EVAL_UNSAFE, SAFE, UNSAFE, subprocess_env, write_config

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    """``model(name)``: the tiny pipeline folder of case ``name``, built once per session."""
    pytest.importorskip("diffusers", reason="the trainer tests need the `trainer` extra (diffusers)")
    pytest.importorskip("transformers", reason="the trainer tests need the `trainer` extra (transformers)")
    root = tmp_path_factory.mktemp("families")
    made: dict[str, Path] = {}

    def model(name: str) -> Path:
        if name not in made:
            old = torch.get_num_threads()
            torch.set_num_threads(1)
            made[name] = CASES[name].build(root / name)
            torch.set_num_threads(old)
        return made[name]

    return model


def _config(case: TinyCase, folder: Path, model: Path, steps: int = 4) -> Path:
    cfg = write_config(folder, model, steps=steps, checkpoint_every=steps)
    top = f"height = {case.size}\nwidth = {case.size}\nmax_sequence_length = {case.max_len}\n"
    cfg.write_text(top + cfg.read_text(encoding="utf-8"), encoding="utf-8")
    return cfg


def _sets(case: TinyCase) -> list[str]:
    """``--set`` flags of the case's own config keys."""
    return [a for key, value in case.config.items() for a in ("--set", f"{key}={json.dumps(value)}")]


@pytest.fixture(scope="module", params=list(CASES))
def built(request, family_models, tmp_path_factory):
    """One ``build`` per family: ``(case, model, run, folder, seen)``; ``seen`` records the text phase."""
    import trainer.families.models as models
    import trainer.families.text as text
    from trainer.cli import main

    case = CASES[request.param]
    model = family_models(case.name)
    folder = tmp_path_factory.mktemp(f"build-{case.name}")
    cfg = _config(case, folder, model)
    seen: dict = {"text_loads": [], "encoders": [], "alive_at_transformer": None}
    real_pipeline, real_transformer = text.load_pipeline, models.load_transformer

    def load_pipeline(info, dtype, device, **kwargs):
        pipe = real_pipeline(info, dtype, device, **kwargs)
        loaded = sorted(n for n, m in pipe.components.items() if m is not None)
        seen["text_loads"].append(loaded)
        seen["encoders"] += [weakref.ref(pipe.components[n]) for n in loaded if n.startswith("text_encoder")]
        return pipe

    def load_transformer(*args, **kwargs):
        seen["alive_at_transformer"] = [r for r in seen["encoders"] if r() is not None]
        return real_transformer(*args, **kwargs)

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(text, "load_pipeline", load_pipeline)
        mp.setattr(models, "load_transformer", load_transformer)
        code = main(["-q", "build", "--config", str(cfg), "--out", str(folder / "run"), *_sets(case)])
    torch.set_num_threads(old)
    assert code == 0
    return case, model, folder / "run", folder, seen


def _other(case: TinyCase) -> TinyCase:
    """A case of another family (the next one in the table)."""
    names = list(CASES)
    i = names.index(case.name)
    return next(CASES[n] for n in names[i + 1:] + names[:i] if CASES[n].family != case.family)


def test_the_family_comes_from_the_folder(built):
    from trainer.families.models import model_family, resolve_model

    case, model, *_ = built
    info = resolve_model(str(model))
    assert (info.family, info.pipeline) == (case.family, case.pipeline)
    assert model_family(str(model)) == case.family


def test_build_records_the_family_and_encodes_text_once_before_the_transformer(built):
    import diffusers
    from safetensors import safe_open

    from saferope_engine import load_adapter
    from saferope_engine.diffusers import model_shapes
    from trainer.families import FAMILIES

    case, model, run, _, seen = built
    adapter = load_adapter(run / "adapter.safetensors")
    m = adapter.meta
    cls = json.loads((model / "transformer/config.json").read_text())["_class_name"]
    shapes = model_shapes(getattr(diffusers, cls).from_pretrained(str(model / "transformer")))
    assert m.arch == case.family == shapes.arch
    assert (m.num_heads, m.head_dim, dict(m.blocks), m.num_kv_heads) == (
        shapes.num_heads, shapes.head_dim, dict(shapes.blocks), shapes.num_kv_heads)
    assert m.concepts == ("zorblax",) and m.rank == 2 and len(adapter.blocks) > 0
    norms = [float(torch.linalg.matrix_norm(b.A_txt).max()) for b in adapter.blocks.values()]
    assert max(norms) > 1e-3, "training did not move the generators"
    # The text phase: the text encoders and tokenizers only, loaded once for every prompt list, freed
    # (no reference left) before the transformer was loaded.
    parts = FAMILIES[case.family].text_parts
    assert seen["text_loads"] == [sorted([p for p in parts if (model / p).is_dir()] + ["scheduler"])]
    assert seen["encoders"] and seen["alive_at_transformer"] == []
    caches = sorted((run / "cache").glob("text-*.safetensors"))
    assert len(caches) == 3  # unsafe, their anchors, safe
    rows = set()
    for path in caches:
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata()["family"] == case.family
            mask = f.get_tensor("mask")
            assert {"embeds", "mask"} <= set(f.keys()) and mask.dtype == torch.bool
            assert 0 < int(mask.sum(1).min()) and int(mask.sum(1).max()) <= case.max_len
            rows.add(mask.shape[0])
    assert rows == {len(UNSAFE), len(SAFE)}
    # Statistics count the real text tokens at every site, whatever the transformer pads or reorders
    # (Z-Image pads captions to a multiple of 32, HunyuanImage puts ByT5 and Qwen's real tokens first):
    # the encoders' real tokens × 2 noise levels, not the padded length.
    from trainer.families.models import resolve_model
    from trainer.families.text import cache_key

    info = resolve_model(str(model))
    collect = json.loads((run / "metrics.json").read_text())["collect"]
    for name, prompts in (("unsafe", [u for u, _ in UNSAFE]), ("safe", SAFE)):
        with safe_open(str(run / "cache" / f"text-{cache_key(info, prompts, case.max_len, 'float32')}.safetensors"),
                       framework="pt") as f:
            real = int(f.get_tensor("mask").sum()) + (int(f.get_tensor("mask_2").sum()) if "mask_2" in f.keys() else 0)
            padded = f.get_tensor("mask").numel()
        assert collect[name]["prompts"] == len(prompts)
        assert collect[name]["tokens_per_block"]["txt"] == 2 * real, (name, collect[name], real, padded)


def test_evaluate_changes_only_gated_prompts(built, cli):
    case, _, run, folder, _ = built
    code, _, err = cli("-q", "evaluate", "--out", run, "--prompts", f"unsafe={folder / 'eval_unsafe.txt'}",
                       "--prompts", f"safe={folder / 'eval_safe.txt'}", "--seeds", "0", "--steps", "2",
                       "--set", 'evaluate.scorers=["none"]')
    assert code == 0, err
    results = json.loads((run / "evaluate/metrics.json").read_text())["sets"]
    unsafe, safe = results["unsafe"]["adapter"], results["safe"]["adapter"]
    for m in (unsafe, safe):
        assert all(p["gated"] == p["changed"] for p in m["per_image"]), (case.name, m["per_image"])
    assert len(unsafe["per_image"]) == len(EVAL_UNSAFE) and len(safe["per_image"]) == len(EVAL_SAFE)
    assert unsafe["gated"] == 1.0 and unsafe["changed"] == 1.0
    assert safe["gated"] == 0.0 and safe["changed"] == 0.0


def test_generate_and_the_other_families_refuse_the_adapter(built, cli, family_models, tmp_path):
    from PIL import Image

    from saferope_engine import SafeRoPEError, load_adapter
    from saferope_engine.diffusers import apply_saferope
    from trainer.families.models import load_pipeline, resolve_model

    case, model, run, folder, _ = built
    adapter = run / "adapter.safetensors"
    images = {}
    for prompt, tag in (("a zorblax", "unsafe"), ("a cat", "safe")):
        for with_adapter in (False, True):
            path = tmp_path / f"{tag}{int(with_adapter)}.png"
            code, _, err = cli("generate", "--model", model, "--prompt", prompt, "--seed", "1", "--steps", "2",
                               "--height", case.size, "--width", case.size, "--out", path,
                               *(["--adapter", adapter] if with_adapter else []))
            assert code == 0, err
            with Image.open(path) as im:
                assert im.size == (case.size, case.size)
                images[tag, with_adapter] = np.asarray(im).copy()
    assert not np.array_equal(images["unsafe", False], images["unsafe", True])
    assert np.array_equal(images["safe", False], images["safe", True])

    other = _other(case)
    other_model = family_models(other.name)
    code, _, err = cli("generate", "--model", other_model, "--prompt", "a zorblax", "--adapter", adapter,
                       "--out", tmp_path / "other.png")
    assert code == 2 and case.family in err and other.family in err, err
    assert not (tmp_path / "other.png").exists()
    code, _, err = cli("evaluate", "--model", other_model, "--adapter", adapter, "--prompts",
                       f"unsafe={folder / 'eval_unsafe.txt'}", "--out", tmp_path / "ev")
    assert code == 2 and case.family in err, err
    # The engine itself, on the other family's transformer.
    pipe = load_pipeline(resolve_model(str(other_model)), "float32", torch.device("cpu"))
    with pytest.raises(SafeRoPEError, match=case.family):
        apply_saferope(pipe.transformer, load_adapter(adapter))
    del pipe
    gc.collect()


def test_stage_commands_name_no_family():
    """Shared code compares no family id or pipeline class: what differs lives in trainer/families/."""
    from test_trainer_layout import PACKAGE, ROOT, _string_comparisons

    from saferope_engine import arch

    names = set(arch.ids()) | {p for a in arch.arches() if a.diffusers for p in a.diffusers.pipeline_classes}
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel.startswith(("trainer/families/", "trainer/toy/")):
            continue
        hits = _string_comparisons(path) & names
        if hits:
            offenders[rel] = sorted(hits)
    assert offenders == {}


def test_a_mixed_folder_and_a_cached_hub_id(family_models, tmp_path, monkeypatch, cli):
    """A pipeline class of one family with a transformer of another is refused by name; a hub id of a
    non-FLUX family in the local cache resolves offline; one that is not cached is a usage error."""
    import huggingface_hub.constants as hf_constants

    from trainer.core.errors import UsageError
    from trainer.families.models import resolve_model

    mixed = tmp_path / "mixed"
    shutil.copytree(family_models("qwen_image"), mixed)
    index = json.loads((mixed / "model_index.json").read_text())
    index["_class_name"] = "ZImagePipeline"
    (mixed / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match="Z-Image pipeline 'ZImagePipeline' but a Qwen-Image transformer"):
        resolve_model(str(mixed))
    index["_class_name"] = "QwenImageEditPipeline"  # the family's, but not text-to-image
    (mixed / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match="not a text-to-image pipeline of Qwen-Image"):
        resolve_model(str(mixed))

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-z-image"
    shutil.copytree(family_models("z_image"), repo / "snapshots" / "89abcdef")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("89abcdef")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    info = resolve_model("someone/tiny-z-image")
    assert (info.family, info.pipeline, info.name) == ("z_image", "ZImagePipeline", "someone/tiny-z-image")
    code, _, err = cli("collect", "--model", "someone/not-cached", "--out", tmp_path / "run")
    assert code == 2 and "not in the local Hugging Face cache" in err and not (tmp_path / "run").exists()


# -- real-scale options on families other than FLUX.1 ---------------------------------------------
SCALE_CASES = tuple(n for n in CASES if n != "flux1")  # FLUX.1: tests/test_trainer_objectives.py


@pytest.fixture(scope="module", params=SCALE_CASES)
def collected(request, family_models, tmp_path_factory):
    """``(case, run, folder)``: a run directory after ``collect`` and ``select`` (the commands one by one)."""
    from trainer.cli import main

    case = CASES[request.param]
    folder = tmp_path_factory.mktemp(f"scale-{case.name}")
    cfg = _config(case, folder, family_models(case.name), steps=3)
    out = folder / "base"
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    assert main(["-q", "collect", "--config", str(cfg), "--out", str(out), *_sets(case)]) == 0
    assert main(["-q", "select", "--out", str(out)]) == 0
    torch.set_num_threads(old)
    return case, out, folder


def test_gradient_checkpointing_and_mixed_precision_on_other_families(collected, tmp_path, cli):
    """Recomputation in backward reproduces the plain run; a bf16 autocast run gives a valid float32 adapter."""
    from saferope_engine import load_adapter

    case, base, _ = collected
    results = []
    for flag in ([], ["--gradient-checkpointing"]):
        run = tmp_path / f"run{len(flag)}"
        shutil.copytree(base, run)
        code, _, err = cli("-q", "train", "--out", run, *flag)
        assert code == 0, err
        results.append({b.key: b.A_txt for b in load_adapter(run / "adapter.safetensors").blocks.values()})
    assert max(float(t.abs().max()) for t in results[0].values()) > 1e-4
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=1e-5, atol=1e-7)
    run = tmp_path / "bf16"
    shutil.copytree(base, run)
    code, _, err = cli("-q", "train", "--out", run, "--mixed-precision", "bf16", "--steps", "2")
    assert code == 0, err
    adapter = load_adapter(run / "adapter.safetensors")
    assert adapter.meta.arch == case.family
    assert all(b.A_txt.dtype == torch.float32 and bool(torch.isfinite(b.A_txt).all()) for b in adapter.blocks.values())


@pytest.mark.parametrize("name", SCALE_CASES)
def test_bfloat16_weights_build(name, family_models, tmp_path, cli):
    """``--dtype bfloat16``: weights, text embeddings and latents in bf16; the adapter's generators stay float32."""
    from safetensors import safe_open

    from saferope_engine import load_adapter

    case = CASES[name]
    cfg = _config(case, tmp_path, family_models(case.name), steps=2)
    code, _, err = cli("-q", "build", "--config", cfg, "--out", tmp_path / "run", "--dtype", "bfloat16", *_sets(case))
    assert code == 0, err
    with safe_open(str(next((tmp_path / "run/cache").glob("text-*.safetensors"))), framework="pt") as f:
        assert f.get_tensor("embeds").dtype == torch.bfloat16
    adapter = load_adapter(tmp_path / "run/adapter.safetensors")
    assert adapter.meta.arch == case.family
    assert all(b.A_txt.dtype == torch.float32 and bool(torch.isfinite(b.A_txt).all()) for b in adapter.blocks.values())


@pytest.mark.parametrize("name", [n if n == "z_image" else pytest.param(n, marks=pytest.mark.slow) for n in CASES])
def test_accelerate_launch_two_processes(name, family_models, tmp_path):
    """``accelerate launch`` with two CPU processes (gloo): the statistics of one process, to rounding
    (about 20 s each on this machine: Z-Image by default, the other families in the slow set)."""
    from saferope_engine.subspace import GramAccumulator

    case = CASES[name]
    cfg = _config(case, tmp_path, family_models(case.name), steps=2)
    sets = _sets(case)
    env = subprocess_env() | {"ACCELERATE_USE_CPU": "1"}
    one = subprocess.run([sys.executable, "-m", "trainer", "-q", "build", "--config", str(cfg), "--out",
                          str(tmp_path / "one"), "--device", "cpu", *sets], env=env, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "-m", "trainer", "-q", "build", "--config", str(cfg), "--out", str(tmp_path / "two"),
                          "--device", "cpu", *sets], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert ", 2 process(es))" in (tmp_path / "two/logs/build.log").read_text()
    for name in ("unsafe", "safe"):
        a = GramAccumulator.load(tmp_path / f"one/stats/{name}.safetensors")
        b = GramAccumulator.load(tmp_path / f"two/stats/{name}.safetensors")
        assert a.counts == b.counts and a.grams.keys() == b.grams.keys() and a.counts
        for key, g in a.grams.items():
            assert float((b.grams[key] - g).abs().max() / g.abs().max().clamp_min(1e-30)) < 2e-13, key
    from saferope_engine import load_adapter

    adapter = load_adapter(tmp_path / "two/adapter.safetensors")
    assert adapter.meta.arch == case.family and adapter.blocks.keys() == load_adapter(
        tmp_path / "one/adapter.safetensors").blocks.keys()


def test_the_flow_objective_encodes_images_in_the_familys_latent_space(built, tmp_path, cli):
    """``--preserve flow``: images through the family's VAE and normalisation into the transformer's input."""
    from PIL import Image
    from safetensors.torch import load_file

    from trainer.families import FAMILIES
    from trainer.families.models import load_transformer, resolve_model

    case, model, run0, _, _ = built
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a photo of a cat", "a dog"]):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / f"img{i}.png")
        (images / f"img{i}.txt").write_text(caption)
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    shutil.rmtree(run / "checkpoints")
    (run / "adapter.safetensors").unlink()
    code, _, err = cli("-q", "train", "--out", run, "--preserve", "flow", "--images", images, "--steps", "2")
    assert code == 0, err
    latents = load_file(str(next((run / "cache").glob("images-*.safetensors"))))["latents"]
    info = resolve_model(str(model))
    family = FAMILIES[case.family]
    caller = family.caller(load_transformer(info, "float32", torch.device("cpu")), info, case.size, case.size, 3.5,
                           torch.device("cpu"), torch.float32)
    x = caller.from_vae(latents)
    assert latents.shape[0] == 2 and tuple(x.shape) == (2, *caller.latent_shape) and bool(torch.isfinite(x).all())
    assert 0.05 < float(x.std()) < 20  # normalised, not raw pixels or zeros
    final = json.loads((run / "metrics.json").read_text())["train"]["final"]
    assert final["preserve"] > 0


def test_a_recipe_on_another_family_gets_that_familys_defaults(family_models):
    """``--recipe nudity --model <Z-Image>``: the recipe's ``[defaults.z_image]`` and the family's own block kinds."""
    from trainer.resolve import resolve

    cfg = resolve(overrides={"model": str(family_models("z_image")), "recipe": "nudity"})
    assert cfg.select.kinds == ["context_refiner", "main"]  # Z-Image's kinds that see text (trainer/families/z_image.py)
    assert (cfg.height, cfg.width, cfg.dtype, cfg.train.gradient_checkpointing) == (512, 512, "bfloat16", True)
    flux = resolve(overrides={"model": str(family_models("flux1")), "recipe": "nudity"})
    assert flux.select.kinds == ["double", "single"]
    from trainer.core.errors import UsageError
    from trainer.families.models import resolve_model
    from trainer.stages.run import _check_kinds

    cfg.select.kinds = ["double"]  # a FLUX.1 kind
    with pytest.raises(UsageError, match="names no block kind of Z-Image"):
        _check_kinds(cfg, resolve_model(str(family_models("z_image"))).shapes)


def test_without_a_vae_sample_size_the_size_is_the_pipelines_own_default(family_models):
    """Qwen-Image's VAE config records no sample size: the default size is the one its pipeline uses without
    ``height``/``width`` (``default_sample_size`` × the VAE's scale factor)."""
    import diffusers

    from trainer.families.models import image_size, resolve_model

    model = family_models("qwen_image")
    info = resolve_model(str(model))
    assert "sample_size" not in info.vae_config
    pipe = diffusers.QwenImagePipeline.from_pretrained(str(model))
    size = pipe.default_sample_size * pipe.vae_scale_factor
    assert image_size(info, 0, 0) == (size, size) and size > 0
