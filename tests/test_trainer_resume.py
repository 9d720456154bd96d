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
from trainer_fixtures import subprocess_env, write_config

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

    cfg_dir = selected.parent
    full = ["-q", "collect", "--config", cfg_dir / "config.toml", "--out", tmp_path / "full",
            "--set", "collect.batch_size=1", "--set", "collect.save_every=1"]
    assert cli(*full)[0] == 0

    args, err = _interrupted_collect(cfg_dir, tmp_path / "run", cli, monkeypatch)
    assert "--resume latest" in err
    meta = GramAccumulator.metadata_of(tmp_path / "run/stats/unsafe.safetensors")
    assert meta["complete"] == "0" and meta["next_batch"] == "3"
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


# -- damaged checkpoints and statistics ------------------------------------------------------------

def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trainer: error: "), err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(selected, tmp_path_factory):
    """A copy of ``selected`` trained for 6 steps: checkpoints step 4 and 6 (keep 2) and the adapter."""
    from trainer.cli import main

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    run = _copy(selected, tmp_path_factory.mktemp("trained") / "run")
    assert main(["-q", "train", "--out", str(run), "--steps", "6"]) == 0
    torch.set_num_threads(old)
    assert sorted(d.name for d in (run / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    return run


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the tensor data: same size, other content
    path.write_bytes(bytes(data))


def _legacy_truncated(path: Path) -> None:
    (path.parent / "manifest.json").unlink()  # a checkpoint of an older trainer: found by loading it
    _truncate(path)


def _absurd_generator(path: Path) -> None:
    """One W entry of 1.7e38 (a flipped exponent bit), with a manifest that matches it: intact bytes,
    absurd content."""
    from safetensors.torch import load_file, save_file

    from trainer.core.rundir import write_manifest

    tensors = load_file(str(path))
    name = next(k for k in tensors if k.startswith("W."))
    tensors[name].view(-1)[1] = 1.7e38
    save_file(tensors, str(path))
    write_manifest(path.parent, ["state.safetensors", "state.json"])


DAMAGE = {
    "truncated state.safetensors": ("state.safetensors", _truncate, "the manifest says"),
    "truncated state.json": ("state.json", _truncate, "the manifest says"),
    "corrupt state.safetensors": ("state.safetensors", _flip_byte, "differs from its SHA-256"),
    "truncated, without manifest": ("state.safetensors", _legacy_truncated, "unreadable"),
    "absurd generator": ("state.safetensors", _absurd_generator, "‖A‖_F = "),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_resume_falls_back_to_the_newest_intact_checkpoint(case, trained, tmp_path, cli):
    name, damage, reason = DAMAGE[case]
    run = _copy(trained, tmp_path / "run")
    (run / "adapter.safetensors").unlink()
    damage(run / "checkpoints/step-00000006" / name)
    code, _, err = cli("train", "--out", run, "--resume", "latest", "--steps", "6")
    assert code == 0, err
    log = (run / "logs/train.log").read_text()
    assert f"skipping damaged checkpoint step-00000006: {run / 'checkpoints/step-00000006' / name}" in log
    assert reason in log
    assert "resuming from step-00000004, the newest intact checkpoint" in log
    assert "resumed from" in log and "(step 4)" in log
    # Two steps redone from step 4 give the uninterrupted run's generators exactly.
    a, b = _generators(trained / "adapter.safetensors"), _generators(run / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (run / "checkpoints/step-00000006/manifest.json").is_file()  # rewritten, intact again


def test_resume_without_an_intact_checkpoint_names_the_file(trained, tmp_path, cli):
    run = _copy(trained, tmp_path / "run")
    _truncate(run / "checkpoints/step-00000006/state.safetensors")
    _truncate(run / "checkpoints/step-00000004/state.json")
    before = _snapshot(run)
    code, stdout, err = cli("train", "--out", run, "--resume", "latest")
    assert code == 2 and not stdout
    line = _one_line(err)
    assert f"no intact checkpoint to resume from in {run / 'checkpoints'}" in line
    assert str(run / "checkpoints/step-00000006/state.safetensors") in line and "1 older damaged too" in line
    assert _snapshot(run) == before
    # A damaged checkpoint named explicitly is not replaced by another one.
    code, _, err = cli("train", "--out", run, "--resume", run / "checkpoints/step-00000004")
    assert code == 2 and str(run / "checkpoints/step-00000004/state.json") in _one_line(err)
    assert _snapshot(run) == before


def test_checkpoint_of_an_older_trainer_still_resumes(trained, tmp_path, cli):
    run = _copy(trained, tmp_path / "run")
    for d in (run / "checkpoints").iterdir():
        (d / "manifest.json").unlink()
    code, _, err = cli("-q", "train", "--out", run, "--resume", "latest", "--steps", "8")
    assert code == 0, err
    assert "skipping" not in (run / "logs/train.log").read_text()
    assert json.loads((run / "metrics.json").read_text())["train"]["steps_this_run"] == 2


def test_resume_refuses_another_process_count(trained, tmp_path, cli):
    """A checkpoint trained by 2 processes cannot be continued by 1: each process draws its own samples."""
    from trainer.core.rundir import write_manifest

    run = _copy(trained, tmp_path / "run")
    ckpt = run / "checkpoints/step-00000006"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["fingerprint"]["num_processes"] == 1
    state["fingerprint"]["num_processes"] = 2
    (ckpt / "state.json").write_text(json.dumps(state))
    write_manifest(ckpt, ["state.safetensors", "state.json"])
    before = _snapshot(run)
    code, _, err = cli("train", "--out", run, "--resume", "latest", "--steps", "8")
    assert code == 2 and "settings changed (num_processes 2 → 1)" in _one_line(err)
    assert _snapshot(run) == before


@pytest.mark.parametrize("flags, needle", [
    (["--lr", "1e6"], "step 1: generator "),
    (["--set", "train.init_std=1e6"], "initialisation: generator "),
])
def test_absurd_generators_stop_the_run_naming_the_cause(flags, needle, selected, tmp_path, cli):
    run = _copy(selected, tmp_path / "run")
    code, _, err = cli("-q", "train", "--out", run, "--steps", "3", *flags)
    assert code == 1
    line = _one_line(err)
    assert needle in line and "‖A‖_F = " in line and "> 256" in line
    assert ("train.lr = 1e+06 is likely too large" if "--lr" in flags else "train.init_std = 1e+06 is too large") in line
    assert not (run / "adapter.safetensors").exists() and not (run / "checkpoints").exists()


def _interrupted_collect(cfg_dir: Path, out: Path, cli, monkeypatch) -> tuple[list, str]:
    """Collect with a save after every batch, interrupted in the 4th batch (3 of 6 unsafe batches saved).
    Returns the command's arguments and its stderr; the stage is restored for the next call."""
    import trainer.stages.collect as collect

    args = ["-q", "collect", "--config", cfg_dir / "config.toml", "--out", out,
            "--set", "collect.batch_size=1", "--set", "collect.save_every=1"]
    real = collect._observe_sample
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(collect, "_observe_sample", flaky)
    code, _, err = cli(*args)
    assert code == 130, err
    monkeypatch.setattr(collect, "_observe_sample", real)
    return args, err


def test_collect_falls_back_to_the_previous_statistics_save(selected, tmp_path, cli, monkeypatch):
    from saferope_engine.subspace import GramAccumulator

    cfg_dir = selected.parent
    full = ["-q", "collect", "--config", cfg_dir / "config.toml", "--out", tmp_path / "full",
            "--set", "collect.batch_size=1", "--set", "collect.save_every=1"]
    assert cli(*full)[0] == 0
    run = tmp_path / "run"
    args, _ = _interrupted_collect(cfg_dir, run, cli, monkeypatch)
    prev = GramAccumulator.metadata_of(run / "stats/unsafe.prev.safetensors")
    assert prev["next_batch"] == "2" and prev["complete"] == "0"
    _truncate(run / "stats/unsafe.safetensors")
    code, _, err = cli(*args, "--resume", "latest")
    assert code == 0, err
    log = (run / "logs/collect.log").read_text()
    assert f"skipping damaged statistics unsafe.safetensors: {run / 'stats/unsafe.safetensors'}" in log
    assert "collect unsafe: continuing from unsafe.prev.safetensors, the previous save" in log
    assert "resuming at batch 2/6 from unsafe.prev.safetensors" in log
    for name in ("unsafe", "safe"):
        a = GramAccumulator.load(tmp_path / f"full/stats/{name}.safetensors")
        b = GramAccumulator.load(run / f"stats/{name}.safetensors")
        assert a.counts == b.counts
        for key in a.grams:
            torch.testing.assert_close(b.grams[key], a.grams[key], rtol=1e-10, atol=1e-10)


def test_collect_without_intact_statistics_names_the_files(selected, tmp_path, cli, monkeypatch):
    run = tmp_path / "run"
    args, _ = _interrupted_collect(selected.parent, run, cli, monkeypatch)
    _truncate(run / "stats/unsafe.safetensors")
    _truncate(run / "stats/unsafe.prev.safetensors")
    before = _snapshot(run)
    code, _, err = cli(*args, "--resume", "latest")
    assert code == 2
    line = _one_line(err)
    assert "no intact unsafe statistics to continue from" in line
    assert str(run / "stats/unsafe.safetensors") in line and str(run / "stats/unsafe.prev.safetensors") in line
    assert _snapshot(run) == before


def test_select_on_damaged_statistics_names_the_file(selected, tmp_path, cli):
    run = _copy(selected, tmp_path / "run")
    _truncate(run / "stats/safe.safetensors")
    before = _snapshot(run)
    code, _, err = cli("select", "--out", run)
    assert code == 2
    line = _one_line(err)
    assert str(run / "stats/safe.safetensors") in line and "collect --resume latest" in line
    assert _snapshot(run) == before
