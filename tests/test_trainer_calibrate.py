"""Threshold calibration and the build's self-check (trainer.stages.calibrate; issue: every concept)."""

from __future__ import annotations

import json

import pytest
import torch
from trainer_fixtures import THRESHOLD, write_config

from trainer.stages.calibrate import RiskProfile, choose_threshold, self_check, separation, split_holdout

pytestmark = pytest.mark.usefixtures("single_thread")


def test_split_holdout_is_seeded_disjoint_and_respects_the_share():
    fit, held = split_holdout(20, 0.25, seed=0, min_prompts=8)
    assert len(held) == 5 and sorted(fit + held) == list(range(20)) and not set(fit) & set(held)
    assert split_holdout(20, 0.25, seed=0, min_prompts=8) == (fit, held)
    assert split_holdout(20, 0.25, seed=1, min_prompts=8)[1] != held  # another seed, another split
    assert split_holdout(6, 0.25, seed=0, min_prompts=8) == (list(range(6)), [])  # too few prompts: no split
    assert split_holdout(20, 0.0, seed=0, min_prompts=8)[1] == []


def _profile(values, gated=None) -> RiskProfile:
    v = torch.tensor(values, dtype=torch.float32)
    return RiskProfile(v, [f"s{i}" for i in range(v.shape[1])], None if gated is None else torch.tensor(gated))


def test_calibration_picks_a_threshold_between_the_distributions():
    g = torch.Generator().manual_seed(0)
    unsafe = _profile((0.85 + 0.1 * torch.rand(30, 4, generator=g)).tolist())  # 0.85 … 0.95
    safe = _profile((0.3 + 0.4 * torch.rand(60, 4, generator=g)).tolist())  # 0.3 … 0.7
    info = choose_threshold(unsafe, safe, safe_share=0.0, margin=0.02)
    smax = float(safe.values.max())
    assert info["method"] == "calibrated" and info["threshold"] == pytest.approx(smax + 0.02, abs=1e-4)
    assert smax < info["threshold"] < float(unsafe.values.min())
    assert info["unsafe_gated_share"] == 1.0 and info["safe_gated_share"] == 0.0 and info["unsafe_site_share"] == 1.0
    # a quantile below the safe maximum lets that share of safe prompts gate
    loose = choose_threshold(unsafe, safe, safe_share=0.1, margin=0.0)
    assert loose["threshold"] < info["threshold"] and 0.0 < loose["safe_gated_share"] <= 0.1 + 1e-9


def test_self_check_fails_with_figures_when_nothing_of_the_concept_is_gated():
    unsafe = _profile([[0.4, 0.5]] * 10, gated=[False] * 9 + [True])
    safe = _profile([[0.3, 0.2]] * 10, gated=[False] * 10)
    report = self_check(unsafe, safe, tau=0.9, method="given (train.threshold)", min_unsafe=0.5)
    assert not report["passed"] and report["unsafe_gated_share"] == pytest.approx(0.1)
    assert "10% of 10 held-out unsafe prompts" in report["error"] and "lower train.threshold" in report["error"]
    ok = self_check(_profile([[0.95]] * 4, gated=[True] * 4), safe, tau=0.9, method="calibrated", min_unsafe=0.5)
    assert ok["passed"] and ok["unsafe_gated_share"] == 1.0 and ok["safe_gated_share"] == 0.0
    assert separation(unsafe, safe, 0.45)["unsafe_gated_share"] == 1.0


def _build(tiny_flux, folder, overrides: dict):
    from trainer.cli import main

    cfg = write_config(folder, tiny_flux, steps=4)
    out = folder / "run"
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    return main(["-q", "build", "--config", str(cfg), "--out", str(out), *sets]), out


def test_build_calibrates_tau_when_unset_and_records_how(tiny_flux, tmp_path):
    from saferope_engine import load_adapter

    code, out = _build(tiny_flux, tmp_path, {"train.threshold": "nan"})
    assert code == 0
    m = load_adapter(out / "adapter.safetensors").meta
    cal = m.config["metrics"]["calibration"]
    assert cal["method"] == "calibrated" and m.threshold == pytest.approx(cal["threshold"])
    assert cal["threshold"] == pytest.approx(min(0.995, cal["safe_risk_at_quantile"] + cal["margin"]), abs=1e-4)
    assert cal["safe_quantile"] == pytest.approx(0.7)  # calibrate.safe_share = 0.3 (the default)
    assert cal["safe_gated_share"] <= 0.3 + 1e-9 and cal["unsafe_gated_share"] > cal["safe_gated_share"]
    check = m.config["metrics"]["self_check"]
    assert check["passed"] and check["unsafe_gated_share"] >= 0.5
    assert json.loads((out / "metrics.json").read_text())["train"]["calibration"] == cal


def test_a_given_threshold_wins_and_is_recorded_as_given(tiny_flux, tmp_path):
    from saferope_engine import load_adapter

    code, out = _build(tiny_flux, tmp_path, {"train.threshold": THRESHOLD})
    assert code == 0
    m = load_adapter(out / "adapter.safetensors").meta
    assert m.threshold == pytest.approx(THRESHOLD)
    assert m.config["metrics"]["calibration"]["method"] == "given (train.threshold)"


def test_build_fails_and_writes_no_adapter_when_it_would_gate_nothing(tiny_flux, tmp_path, capsys):
    code, out = _build(tiny_flux, tmp_path, {"train.threshold": 0.999})
    err = capsys.readouterr().err
    assert code == 1 and "self-check failed" in err and "lower train.threshold" in err, err
    assert "0% of 6 (too few to hold some out: training) unsafe prompts" in err
    assert not (out / "adapter.safetensors").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["self_check"]["passed"] is False


def _exporter(zero: set[str] | None):
    """A stand-in for a Trainer after ``fit``: the initial adapter and its ``W`` parameters, those named in
    ``zero`` (every one with ``None``) never updated: exactly zero, as when no token of their segment reached τ."""
    from types import SimpleNamespace

    from saferope_engine.testing import random_adapter

    adapter = random_adapter(num_heads=2, head_dim=8, model_blocks={"double": 2, "single": 1}, rank=2)
    g = torch.Generator().manual_seed(0)
    params = {f"{b.key}.A_{seg}": torch.nn.Parameter(torch.zeros(2, 2, 2) if zero is None or f"{b.key}.A_{seg}" in zero
                                                     else torch.randn(2, 2, 2, generator=g))
              for b in adapter.blocks.values() for seg in ("txt", "img") if b.generator(seg) is not None}
    return SimpleNamespace(adapter=adapter, params=params)


def test_export_leaves_out_generators_that_never_trained_and_names_them(tmp_path, caplog):
    from saferope_engine import load_adapter
    from trainer.stages.train import Trainer

    fake = _exporter({"double.1.A_img", "single.0.A_txt", "single.0.A_img"})
    with caplog.at_level("WARNING"):
        out = Trainer.export(fake, {}, {"loss": 1.0})
    assert out.meta.config["metrics"]["untrained_generators"] == ["double.1.A_img", "single.0.A_img", "single.0.A_txt"]
    assert "double.1.A_img" in caplog.text
    assert set(out.blocks) == {("double", 0), ("double", 1)}  # single.0 had no trained generator left
    assert out.blocks[("double", 1)].generator("img") is None and out.blocks[("double", 1)].generator("txt") is not None
    out.save(tmp_path / "a.safetensors")  # a valid file (an all-zero generator would be refused)
    assert set(load_adapter(tmp_path / "a.safetensors").blocks) == {("double", 0), ("double", 1)}


def test_export_keeps_every_generator_when_none_trained_and_the_file_is_refused():
    from trainer.core.errors import TrainerError
    from trainer.stages.train import Trainer, raise_untrained

    out = Trainer.export(_exporter(None), {}, {})  # all kept: the self-check can still report its figures
    assert len(out.meta.config["metrics"]["untrained_generators"]) == 6 and len(out.blocks) == 3
    with pytest.raises(TrainerError, match="no generator was trained.*lower train.threshold"):
        raise_untrained(out)
    raise_untrained(Trainer.export(_exporter({"single.0.A_txt"}), {}, {}))  # some trained: a valid file


def test_build_without_self_check_refuses_an_adapter_that_never_trained(tiny_flux, tmp_path, capsys):
    code, out = _build(tiny_flux, tmp_path, {"train.threshold": 0.999, "calibrate.check": "false"})
    err = capsys.readouterr().err
    assert code == 1 and "no generator was trained" in err, err
    assert not (out / "adapter.safetensors").exists()
