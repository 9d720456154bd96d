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
    assert 0 < out["transform_share_of_double_block"] and "extra" in out["peak_rss_mb"]


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
