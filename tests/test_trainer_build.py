"""``build`` end to end on the tiny pipeline, then ``evaluate``, ``generate`` and ``inspect`` on its result."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from trainer_fixtures import EVAL_SAFE, EVAL_UNSAFE, THRESHOLD, write_config

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def built(tiny_flux, tmp_path_factory):
    """One build run shared by the tests of this module: ``(run_dir, config_dir, stderr)``."""
    import torch as _torch

    from trainer.cli import main

    old = _torch.get_num_threads()
    _torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("build")
    cfg = write_config(folder, tiny_flux, steps=8)
    out = folder / "run"
    code = main(["-q", "build", "--config", str(cfg), "--out", str(out)])
    _torch.set_num_threads(old)
    assert code == 0
    return out, folder


def test_build_writes_a_loadable_adapter_with_metadata(built):
    from saferope_engine import load_adapter

    out, folder = built
    for rel in ("adapter.safetensors", "metrics.json", "config.resolved.toml", "logs/build.log",
                "select/scores.png", "select/heads.csv", "select/heads.md", "select/selection.json",
                "stats/unsafe.safetensors", "stats/safe.safetensors"):
        assert (out / rel).is_file(), rel
    assert not list(out.rglob(".*.tmp")), "temporary files left behind"
    adapter = load_adapter(out / "adapter.safetensors")
    m = adapter.meta
    assert (m.arch, m.num_heads, m.head_dim, dict(m.blocks)) == ("flux1", 2, 16, {"double": 2, "single": 2})
    assert m.concepts == ("zorblax",) and m.rank == 2 and m.threshold == pytest.approx(THRESHOLD)
    assert m.base_model == "model"  # the model folder's name
    assert m.config["config"]["train"]["steps"] == 8 and m.config["config"]["select"]["count"] == 4
    assert m.config["config"]["prompts"]["unsafe"] == str(folder / "unsafe.txt")
    selection = json.loads((out / "select/selection.json").read_text())
    assert {k: v for k, v in selection["heads"].items()} == {b.key: b.heads.tolist() for b in adapter.blocks.values()}
    assert sum(b.heads.numel() for b in adapter.blocks.values()) == 4
    assert all(kind == "double" for kind, _ in adapter.blocks)
    norms = [float(torch.linalg.matrix_norm(b.A_txt).max()) for b in adapter.blocks.values()]
    assert max(norms) > 1e-3, "training did not move the generators"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 8 and metrics["select"]["heads_selected"] == 4
    assert metrics["collect"]["unsafe"]["prompts"] == 6
    from PIL import Image

    with Image.open(out / "select/scores.png") as im:
        assert im.format == "PNG" and im.width > 0 and im.height > 0


def test_collect_excludes_padding(built, tiny_flux):
    """Token counts are the real T5 tokens × noise levels, not the padded length."""
    from trainer_fixtures import SAFE, UNSAFE
    from transformers import AutoTokenizer

    out, _ = built
    tok = AutoTokenizer.from_pretrained(str(tiny_flux / "tokenizer_2"))
    metrics = json.loads((out / "metrics.json").read_text())["collect"]
    for name, prompts in (("unsafe", [u for u, _ in UNSAFE]), ("safe", SAFE)):
        real = int(tok(prompts, padding="max_length", max_length=12, truncation=True,
                       return_tensors="pt").attention_mask.sum())
        assert real < len(prompts) * 12
        assert metrics[name]["tokens_per_block"]["txt"] == real * 2  # two sigmas, one sample each


def test_resolved_config_round_trips(built):
    from trainer.resolve import resolve

    out, _ = built
    cfg = resolve(run_config=out / "config.resolved.toml")
    assert cfg.train.steps == 8 and cfg.select.kinds == ["double"] and cfg.out == str(out)


def test_evaluate_changes_only_gated_prompts(built, tiny_flux, cli):
    out, folder = built
    code, stdout, err = cli("-q", "evaluate", "--out", out, "--prompts", f"unsafe={folder / 'eval_unsafe.txt'}",
                            "--prompts", f"safe={folder / 'eval_safe.txt'}", "--seeds", "0,1", "--steps", "3")
    assert code == 0, err
    results = json.loads((out / "evaluate/metrics.json").read_text())
    unsafe = results["sets"]["unsafe"]["adapter"]
    safe = results["sets"]["safe"]["adapter"]
    for m in (unsafe, safe):
        assert all(p["gated"] == p["changed"] for p in m["per_image"]), m["per_image"]
    assert unsafe["gated"] == 1.0 and unsafe["changed"] == 1.0 and unsafe["psnr_changed"] > 0
    assert safe["gated"] == 0.0 and safe["changed"] == 0.0
    assert len(unsafe["per_image"]) == len(EVAL_UNSAFE) * 2
    images = sorted((out / "evaluate/images/safe/adapter").glob("*.png"))
    assert len(images) == len(EVAL_SAFE) * 2
    assert "unsafe" in stdout and "changed" in stdout
    assert "evaluate" in json.loads((out / "metrics.json").read_text())


def test_generate_matches_nodes_math(built, tiny_flux, tmp_path, cli):
    """`generate` with and without the adapter: gated prompt changes, safe prompt is bit-identical."""
    from PIL import Image

    out, _ = built
    adapter = out / "adapter.safetensors"
    arrays = {}
    for prompt, tag in (("a zorblax", "u"), ("a cat", "s")):
        for with_adapter in (False, True):
            path = tmp_path / f"{tag}{int(with_adapter)}.png"
            args = ["generate", "--model", tiny_flux, "--prompt", prompt, "--seed", "3", "--steps", "3", "--out", path]
            if with_adapter:
                args += ["--adapter", adapter]
            code, stdout, err = cli(*args)
            assert code == 0, err
            assert "wrote" in stdout
            with Image.open(path) as im:
                arrays[(tag, with_adapter)] = np.asarray(im).copy()
    assert not np.array_equal(arrays[("u", False)], arrays[("u", True)])
    assert np.array_equal(arrays[("s", False)], arrays[("s", True)])
    # Strength 0 is the base model, bit for bit.
    path = tmp_path / "strength0.png"
    code, _, err = cli("generate", "--model", tiny_flux, "--prompt", "a zorblax", "--seed", "3", "--steps", "3",
                       "--adapter", adapter, "--strength", "0", "--out", path)
    assert code == 0, err
    with Image.open(path) as im:
        assert np.array_equal(np.asarray(im), arrays[("u", False)])
    # Refuses to overwrite.
    code, _, err = cli("generate", "--model", tiny_flux, "--prompt", "a cat", "--out", path)
    assert code == 2 and "exists" in err and len(err.strip().splitlines()) == 1


def test_inspect_describes_the_adapter(built, cli):
    out, _ = built
    code, stdout, _ = cli("inspect", out / "adapter.safetensors")
    assert code == 0
    assert "rank         2" in stdout and "zorblax" in stdout and "double.0" in stdout
    code, stdout, _ = cli("inspect", "--json", out / "adapter.safetensors")
    data = json.loads(stdout)
    assert data["rank"] == 2 and data["num_heads_patched"] == 4
    assert all(len(b["generator_norms"]["txt"]) == len(b["heads"]) for b in data["blocks"])


def test_select_alone_rewrites_the_selection(built, cli, tmp_path):
    import shutil

    out, _ = built
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    code, _, err = cli("-q", "select", "--out", copy, "--count", "2")
    assert code == 0, err
    sel = json.loads((copy / "select/selection.json").read_text())
    assert sum(len(v) for v in sel["heads"].values()) == 2
    lines = (copy / "select/heads.csv").read_text().strip().splitlines()
    assert lines[0] == "rank,kind,block,head,score,selected" and len(lines) == 1 + 2 * 4  # every head listed
    # A training run in this directory already exists: train refuses to start over silently.
    code, _, err = cli("train", "--out", copy)
    assert code == 2 and "--resume latest" in err


def _strict_json(text: str):
    """Parse as RFC 8259 JSON: NaN/Infinity literals are an error."""
    def no_constants(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=no_constants)


def test_inspect_output_is_strict_json_and_printable():
    """Lone surrogates, control characters and non-finite numbers, wherever they sit in a summary."""
    from trainer.commands.inspect import describe, to_json, visible_text

    summary = {"source": "x\udcff.safetensors", "arch": "flux1", "family": "FLUX.1", "base_model": "m\x00",
               "concepts": ["zorb\ud800lax"], "num_heads": 2, "num_kv_heads": None, "head_dim": 16,
               "blocks_in_model": {"double": 2, "single": 0}, "rank": 2,
               "threshold": 0.5, "num_blocks_patched": 1, "num_heads_patched": 1, "num_parameters": 1,
               "config": {"x": float("nan"), "y": [float("inf"), -float("inf")], "k\udc80": 1},
               "blocks": [{"block": "double.0", "heads": [0], "segments": ["txt"],
                           "generator_norms": {"txt": [float("nan")]}}]}
    data = _strict_json(to_json(summary))
    assert data["concepts"] == ["zorb\\ud800lax"] and data["base_model"] == "m\\x00"
    assert data["config"] == {"x": "NaN", "y": ["Infinity", "-Infinity"], "k\\udc80": 1}
    assert data["blocks"][0]["generator_norms"]["txt"] == ["NaN"]
    text = describe(visible_text(summary))
    text.encode("utf-8")  # printable: no lone surrogate left
    assert "zorb\\ud800lax" in text and "0:nan" in text


def test_inspect_survives_a_hostile_adapter_file(built, tmp_path, cli):
    """A file whose metadata holds a lone surrogate and NaN is refused by the engine's format check in one
    line naming the file and the key — never a crash or invalid JSON."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out, _ = built
    with safe_open(str(out / "adapter.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta["concepts"] = '["zorb\\ud800lax"]'
    meta["saferope.config"] = '{"lr": NaN, "note": "x\\u0000y"}'
    hostile = tmp_path / "hostile.safetensors"
    save_file(tensors, str(hostile), metadata=meta)
    for args in (["inspect", "--json", hostile], ["inspect", hostile]):
        code, stdout, err = cli(*args)
        lines = err.strip().splitlines()
        assert code == 1 and stdout == "", (code, stdout)
        assert len(lines) == 1 and lines[0].startswith("trainer: error: ") and str(hostile) in lines[0], err
        assert "metadata 'saferope.config'" in lines[0] and "NaN" in lines[0], err  # the first bad key, named
