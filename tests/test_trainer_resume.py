"""Checkpoints, kill-and-resume, and resumable statistics collection."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer_fixtures import subprocess_env
from trainer_fixtures import write_config

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def selected(tiny_flux, tmp_path_factory):
    """A run directory after collect + select (no training yet)."""
    from trainer.cli import main

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("resume")
    cfg = write_config(folder, tiny_flux, steps=12, checkpoint_every=2, keep_checkpoints=2)
    out = folder / "base"
    assert main(["-q", "collect", "--config", str(cfg), "--out", str(out)]) == 0
    assert main(["-q", "select", "--out", str(out)]) == 0
    torch.set_num_threads(old)
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _generators(path: Path) -> dict[str, torch.Tensor]:
    from saferope_engine import load_adapter

    a = load_adapter(path)
    return {b.key: b.A_txt for b in a.blocks.values()}


def test_kill_and_resume_equals_uninterrupted(selected, tmp_path, cli):
    straight = _copy(selected, tmp_path / "straight")
    code, _, err = cli("-q", "train", "--out", straight)
    assert code == 0, err

    killed = _copy(selected, tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "-q", "train", "--out", str(killed)],
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not (killed / "checkpoints" / "step-00000004").is_dir():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "adapter.safetensors").exists(), "the run finished before it was killed"
    steps = sorted(int(d.name.split("-")[1]) for d in (killed / "checkpoints").glob("step-*"))
    assert steps and steps[-1] < 12

    code, _, err = cli("train", "--out", killed, "--resume", "latest")
    assert code == 0, err
    assert "resumed from" in (killed / "logs" / "train.log").read_text()
    a, b = _generators(straight / "adapter.safetensors"), _generators(killed / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)
    assert max(float(t.abs().max()) for t in a.values()) > 1e-3  # the generators actually trained
    # Rotation keeps the last two checkpoints; no temporary folders remain.
    names = sorted(d.name for d in (killed / "checkpoints").iterdir())
    assert names == ["step-00000010", "step-00000012"]
    metrics = json.loads((killed / "metrics.json").read_text())["train"]
    assert metrics["steps"] == 12 and metrics["steps_this_run"] == 12 - steps[-1]


def test_resume_refuses_changed_settings(selected, tmp_path, cli):
    run = _copy(selected, tmp_path / "run")
    code, _, err = cli("-q", "train", "--out", run, "--steps", "4")
    assert code == 0, err
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    code, _, err = cli("train", "--out", run, "--resume", "latest", "--lr", "0.5")
    assert code == 2
    assert err.strip().startswith("trainer: error:") and "train.lr" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    # More steps on resume are fine: it continues from step 4.
    code, _, err = cli("-q", "train", "--out", run, "--resume", "latest", "--steps", "6")
    assert code == 0, err
    assert json.loads((run / "metrics.json").read_text())["train"]["steps_this_run"] == 2


def test_collect_resumes_after_interruption(selected, tiny_flux, tmp_path, cli, monkeypatch):
    from saferope_engine.subspace import GramAccumulator

    import trainer.collect as collect

    cfg_dir = selected.parent
    args = ["-q", "collect", "--config", cfg_dir / "config.toml", "--out", tmp_path / "run",
            "--set", "collect.batch_size=1", "--set", "collect.save_every=1"]
    full = ["-q", "collect", "--config", cfg_dir / "config.toml", "--out", tmp_path / "full",
            "--set", "collect.batch_size=1", "--set", "collect.save_every=1"]
    assert cli(*full)[0] == 0

    real = collect._observe_sample
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(collect, "_observe_sample", flaky)
    code, _, err = cli(*args)
    assert code == 130 and "--resume latest" in err
    meta = GramAccumulator.metadata_of(tmp_path / "run/stats/unsafe.safetensors")
    assert meta["complete"] == "0" and meta["next_batch"] == "3"
    monkeypatch.setattr(collect, "_observe_sample", real)
    code, _, err = cli(*args)
    assert code == 2 and "--resume latest" in err  # partial statistics are not silently restarted
    code, _, err = cli(*args, "--resume", "latest")
    assert code == 0, err
    for name in ("unsafe", "safe"):
        a = GramAccumulator.load(tmp_path / f"full/stats/{name}.safetensors")
        b = GramAccumulator.load(tmp_path / f"run/stats/{name}.safetensors")
        assert a.counts == b.counts
        for key in a.grams:
            torch.testing.assert_close(b.grams[key], a.grams[key], rtol=1e-10, atol=1e-10)


def test_statistics_size_does_not_grow_with_prompts(selected, tiny_flux, tmp_path, cli):
    """Gram accumulation: the statistics file of 12 prompts is as large as that of 6."""
    cfg_dir = selected.parent
    many = tmp_path / "many.txt"
    lines = (cfg_dir / "unsafe.txt").read_text().splitlines()
    many.write_text("\n".join(lines + [ln for ln in lines if not ln.startswith("#")]) + "\n")
    code, _, err = cli("-q", "collect", "--config", cfg_dir / "config.toml", "--out", tmp_path / "many", "--unsafe", many)
    assert code == 0, err
    small = (selected / "stats/unsafe.safetensors").stat().st_size
    large = (tmp_path / "many/stats/unsafe.safetensors").stat().st_size
    assert abs(large - small) < 200  # only the header's numbers differ
    m = json.loads((tmp_path / "many/metrics.json").read_text())["collect"]
    assert m["unsafe"]["prompts"] == 12
