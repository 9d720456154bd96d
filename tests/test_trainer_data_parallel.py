"""Data parallelism on the CPU: two processes over gloo (``torchrun --standalone --nproc_per_node 2``).

Statistics equal a single process's to rounding, training resumes exactly with the same process
count and refuses another one, evaluation splits its batches and writes the same images once,
and the flow objective's image cache is written by one process. The first test (a 2-process build
against a 1-process one, about 20 s on 2 cores) runs by default; the others (about 40 s more) are
in the slow set (``pytest -m slow``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_fixtures import subprocess_env, write_config

pytestmark = pytest.mark.usefixtures("single_thread")


def _trainer(*args, procs: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [sys.executable]
    proc = subprocess.run([*launcher, "-m", "trainer", *map(str, args)], env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)
    return proc


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _adapter(path: Path):
    from saferope_engine import load_adapter

    return load_adapter(path)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tiny_flux, tmp_path_factory):
    """``(folder, one, two)``: the same 4-step build by one process and by two."""
    folder = tmp_path_factory.mktemp("dp")
    cfg = write_config(folder, tiny_flux, steps=4, checkpoint_every=2)
    _ok(_trainer("-q", "build", "--config", cfg, "--out", folder / "one", "--device", "cpu"))
    two = _ok(_trainer("build", "--config", cfg, "--out", folder / "two", "--device", "cpu", procs=2))
    return folder, folder / "one", folder / "two", two.stderr


def test_two_processes_collect_the_statistics_of_one(runs):
    from saferope_engine.subspace import GramAccumulator

    _, one, two, stderr = runs
    for name in ("unsafe", "safe"):
        a = GramAccumulator.load(one / f"stats/{name}.safetensors")
        b = GramAccumulator.load(two / f"stats/{name}.safetensors")
        assert a.counts == b.counts and a.grams.keys() == b.grams.keys()
        for key, g in a.grams.items():
            assert float((b.grams[key] - g).abs().max() / g.abs().max()) < 2e-13, key
    assert json.loads((one / "select/selection.json").read_text())["heads"] == \
        json.loads((two / "select/selection.json").read_text())["heads"]
    # Same heads and bases in the adapter; the generators are trained (each process draws its own samples,
    # so they are not those of one process: the effective batch is twice as large).
    a, b = _adapter(one / "adapter.safetensors"), _adapter(two / "adapter.safetensors")
    assert a.blocks.keys() == b.blocks.keys()
    for key in a.blocks:
        assert torch.equal(a.blocks[key].heads, b.blocks[key].heads)
        torch.testing.assert_close(b.blocks[key].U_q, a.blocks[key].U_q, rtol=0, atol=1e-6)
        assert bool(torch.isfinite(b.blocks[key].A_txt).all())
    assert max(float(blk.A_txt.abs().max()) for blk in b.blocks.values()) > 1e-3
    # One process logs progress; the other only warnings (none here), so no line appears twice.
    lines = [ln for ln in stderr.splitlines() if ln.startswith("trainer")]
    assert lines and not any(ln.startswith("trainer[rank 1]") for ln in lines), stderr
    assert sum("checkpoint " in ln and "step-00000004" in ln for ln in lines) == 1
    assert sorted(p.name for p in (two / "logs").iterdir()) == ["build.log"]
    metrics = json.loads((two / "metrics.json").read_text())["train"]
    assert metrics["steps"] == 4 and metrics["final"]["loss"] > 0


@pytest.mark.slow
def test_two_processes_resume_exactly_and_refuse_another_count(runs, tmp_path):
    _, _, two, _ = runs
    run = tmp_path / "run"
    shutil.copytree(two, run)
    shutil.rmtree(run / "checkpoints")
    (run / "adapter.safetensors").unlink()
    _ok(_trainer("-q", "train", "--out", run, "--steps", "2", "--device", "cpu", procs=2))
    before = _snapshot(run)
    refused = _trainer("train", "--out", run, "--resume", "latest", "--steps", "4", "--device", "cpu")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"trainer: error: cannot resume from '{run / 'checkpoints/step-00000002'}': settings changed "
        "(num_processes 2 → 1)"]
    assert _snapshot(run) == before
    _ok(_trainer("-q", "train", "--out", run, "--resume", "latest", "--steps", "4", "--device", "cpu", procs=2))
    a, b = _adapter(two / "adapter.safetensors"), _adapter(run / "adapter.safetensors")
    assert all(torch.equal(a.blocks[k].A_txt, b.blocks[k].A_txt) for k in a.blocks)


@pytest.mark.slow
def test_evaluate_splits_batches_and_writes_once(runs, tiny_flux, tmp_path):
    folder, one, _, _ = runs
    args = ["--model", tiny_flux, "--prompts", f"u={folder / 'eval_unsafe.txt'}", "--prompts", f"s={folder / 'eval_safe.txt'}",
            "--seeds", "0,1", "--steps", "2", "--set", "evaluate.batch_size=2", "--device", "cpu",
            "--adapter", one / "adapter.safetensors"]
    single, double = tmp_path / "single", tmp_path / "double"
    _ok(_trainer("-q", "evaluate", "--out", single, *args))
    proc = _ok(_trainer("-q", "evaluate", "--out", double, *args, procs=2))
    assert proc.stdout.count("metrics:") == 1  # the table is printed once
    images = lambda d: {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted((d / "evaluate/images").rglob("*.png"))}
    assert images(single) and images(single) == images(double)
    assert json.loads((single / "evaluate/metrics.json").read_text()) == \
        json.loads((double / "evaluate/metrics.json").read_text())


@pytest.mark.slow
def test_flow_images_are_encoded_by_one_process(runs, tmp_path):
    import numpy as np
    from PIL import Image

    _, one, _, _ = runs
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text("a photo of a cat\n")
    run = tmp_path / "run"
    shutil.copytree(one, run)
    shutil.rmtree(run / "checkpoints")
    (run / "adapter.safetensors").unlink()
    _ok(_trainer("-q", "train", "--out", run, "--steps", "2", "--preserve", "flow", "--images", images,
                 "--device", "cpu", procs=2))
    assert len(list((run / "cache").glob("images-*.safetensors"))) == 1
    assert not [p for p in (run / "cache").iterdir() if p.name.startswith(".")]
    assert (run / "adapter.safetensors").is_file()


def test_device_cuda_n_is_refused_under_a_launcher(monkeypatch):
    """`--device cuda:N` in each of N launched processes would make every process the main one."""
    from trainer.core.errors import UsageError
    from trainer.core.runtime import launched_processes, make_runtime

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert launched_processes() == (1, 2)
    with pytest.raises(UsageError, match=r"--device cuda:1 names one GPU, but this is one of 2 launched processes"):
        make_runtime("cuda:1", "no")


def test_other_ranks_log_warnings_only_with_their_rank(monkeypatch, capsys):
    import logging

    from trainer.cli import _one_line, setup_logging

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    setup_logging(verbose=False, quiet=False)
    try:
        log = logging.getLogger("trainer.test")
        log.info("progress line")
        log.warning("a warning")
        _one_line("it failed")
        err = capsys.readouterr().err.splitlines()
        assert err == ["trainer[rank 1]: a warning", "trainer[rank 1]: error: it failed"]
    finally:
        monkeypatch.delenv("RANK")
        monkeypatch.delenv("WORLD_SIZE")
        setup_logging(verbose=False, quiet=False)
