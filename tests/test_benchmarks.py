"""The benchmark scripts run and print what the README quotes (figures are not asserted: they are measurements)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_fixtures import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=subprocess_env(), cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_engine_overhead_small_prints_every_figure():
    out = json.loads(_run("benchmarks/engine_overhead.py", "--small", "--repeats", "1"))
    for block in ("double_block", "single_block"):
        for case in ("all_tokens_gated", "no_token_gated"):
            assert out[block][case]["base_s"] > 0 and out[block][case]["ratio"] > 0
    assert out["transform"]["max_abs_diff"] <= 1e-5 and out["transform"]["speedup"] > 0
    assert 0 < out["transform_share_of_double_block"] and 0 < out["transform_share_of_double_block_median"]
    assert "extra" in out["peak_rss_mb"]
    assert 0 < out["op_counts"]["qk_device"]["computing"] <= 16 and out["op_counts"]["qk_device"]["top_level"] <= 40


def test_train_step_small_runs_both_variants():
    pytest.importorskip("diffusers")
    out = _run("benchmarks/train_step.py", "--small", "--steps", "2", "--warmup", "1")
    assert "plain" in out and "checkpointing" in out and "peak_rss_mib" in out


def test_toy_step_times_an_adapter(tmp_path):
    pytest.importorskip("diffusers")
    from saferope_engine.testing import random_adapter
    from trainer.toy import load_pipeline

    cfg = load_pipeline().transformer.config
    path = tmp_path / "a.safetensors"
    random_adapter(num_heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim,
                   model_blocks={"double": cfg.num_layers, "single": cfg.num_single_layers}, rank=2).save(path)
    out = json.loads(_run("benchmarks/toy_step.py", str(path), "--rounds", "1", "--batch", "4"))
    assert set(out["relative_to_base"]) == {"base", "a.safetensors"} and out["relative_to_base"]["base"] == 1.0


def test_op_count_small_prints_both_counts_for_every_case():
    out = json.loads(_run("benchmarks/op_count.py", "--small"))
    for case, c in out["counts"].items():
        assert 0 < c["computing"] <= c["top_level"], (case, c)
    assert out["counts"]["qk_device"]["computing"] <= 16 and out["counts"]["qk_device"]["top_level"] <= 40


def test_gated_share_small_times_every_share_and_names_the_path():
    out = json.loads(_run("benchmarks/gated_share.py", "--small", "--repeats", "1", "--shares", "0", "0.05", "1"))
    rows = {r["share"]: r for r in out["rows"]}
    assert rows[0.0]["gated"] == 0.0 and rows[0.0]["path"] == "none gated"
    assert rows[1.0]["gated"] == 1.0 and rows[1.0]["path"] == "dense"
    assert 0.0 < rows[0.05]["gated"] < 0.2 and rows[0.05]["path"] in ("gathered", "dense")
    assert all(r["best_ms"] > 0 and r["median_ms"] >= r["best_ms"] for r in out["rows"])


def test_gpu_benchmark_small_runs_every_stage_but_compile():
    pytest.importorskip("diffusers")
    out = json.loads(_run("benchmarks/gpu.py", "--small", "--no-compile"))
    eager = out["step"]["eager"]
    assert eager["base"]["step_s"] > 0 and eager["saferope"]["step_s"] > 0 and eager["ratio"] > 0
    assert eager["max_abs_diff_vs_base"] > 0  # the transform acted on every head
    assert eager["patched_heads"] == out["config"]["heads"] * (out["config"]["double"] + out["config"]["single"])
    assert out["train"]["plain"]["step_s_median"] > 0 and out["train"]["checkpointing"]["step_s_median"] > 0
    assert out["step"]["compiled"] == {"skipped": "--no-compile"}
    assert "skipped" in out["comfyui"] or out["comfyui"].get("max_abs_diff_vs_base", 0) > 0


@pytest.mark.slow
def test_gpu_benchmark_small_with_compile():
    """The compiled stages too (each compiles a tiny FLUX with inductor: a few minutes on a small CPU)."""
    pytest.importorskip("diffusers")
    out = json.loads(_run("benchmarks/gpu.py", "--small", "--no-train"))
    for variant in ("base", "saferope"):
        assert out["step"]["compiled"][variant]["step_s"] > 0, out["step"]["compiled"]
    assert out["step"]["compiled"]["saferope"]["graph_breaks"] == 0


def test_gpu_benchmark_without_cuda_fails_with_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    r = subprocess.run([sys.executable, "benchmarks/gpu.py"], capture_output=True, text=True, env=subprocess_env(),
                       cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "no CUDA device" in r.stderr and "--small" in r.stderr


def test_build_memory_estimates_every_family():
    from saferope_engine import arch

    out = json.loads(_run("benchmarks/build_memory.py", "--json"))
    rows = {r["family"]: r for r in out["models"]}
    assert set(rows) == set(arch.ids())
    flux = rows["flux1"]
    assert flux["transformer_gb"] == pytest.approx(23.8, abs=0.05)  # 11.9e9 parameters × 2 bytes
    for r in rows.values():
        phases = {p: r[f"{p}_gb"] for p in ("encode", "collect", "train")}
        assert r["peak_gb"] == max(phases.values()) and r["peak_phase"] == max(phases, key=phases.get)
        assert r["encode_gb"] < r["together_gb"] and r["train_gb"] < r["train_no_checkpointing_gb"]
    table = _run("benchmarks/build_memory.py")
    assert "estimate (computed, not measured: no GPU)" in table and "Qwen-Image" in table
