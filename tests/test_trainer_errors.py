"""Bad inputs: a one-line error, a non-zero exit code, and nothing written to the output directory."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_fixtures import subprocess_env
from trainer_fixtures import write_config

pytestmark = pytest.mark.usefixtures("single_thread")


def _snapshot(folder: Path) -> dict[str, bytes] | None:
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("trainer: error: ") and "Traceback" not in err
    return lines[0]


def _no_transformer(tiny_flux: Path, tmp: Path) -> Path:
    broken = tmp / "broken-model"
    shutil.copytree(tiny_flux, broken)
    shutil.rmtree(broken / "transformer")
    return broken


CASES = {
    "empty unsafe prompt file": (lambda d, m: ["--unsafe", _write(d / "empty.txt", "# only a comment\n\n")],
                                 "has no prompts"),
    "missing safe prompt file": (lambda d, m: ["--safe", d / "nope.txt"], "not found"),
    "model without transformer": (lambda d, m: ["--model", _no_transformer(m, d)], "no transformer/ folder"),
    "unknown config key": (lambda d, m: ["--set", "train.stepz=3"], "unknown config key 'train.stepz'"),
    "unknown key in the config file": (lambda d, m: ["--config", _write(d / "bad.toml", "[select]\nranq = 2\n")],
                                       "unknown config key 'select.ranq'"),
    "rank larger than head_dim": (lambda d, m: ["--rank", "17"], "rank 17 is larger than the model's head_dim 16"),
    "anchor objective without anchors": (lambda d, m: ["--unsafe", _write(d / "plain.txt", "a zorblax\n")],
                                         "anchor objective needs a safe rewrite"),
    "model that does not exist": (lambda d, m: ["--model", d / "no-such-model"], "no such folder"),
    "hub id not in the cache": (lambda d, m: ["--model", "nobody/not-a-cached-model"], "not in the local Hugging Face cache"),
    "bad value type": (lambda d, m: ["--set", "train.steps=\"many\""], "expected an integer"),
    "bad choice": (lambda d, m: ["--unlearn", "forget"], "'forget' is not one of anchor, deviate, none"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(case, tiny_flux, tmp_path, cli):
    cfg = write_config(tmp_path, tiny_flux)
    out = tmp_path / "run"
    make_args, needle = CASES[case]
    extra = make_args(tmp_path, tiny_flux)
    args = ["build", "--out", out] + (["--config", cfg] if "--config" not in extra else []) + extra
    code, stdout, err = cli(*args)
    assert code == 2, err
    assert needle in _one_line(err)
    assert not out.exists(), "the output directory was created"
    assert not stdout


def test_bad_input_keeps_an_existing_run_untouched(tiny_flux, tmp_path, cli):
    cfg = write_config(tmp_path, tiny_flux, steps=2)
    out = tmp_path / "run"
    assert cli("-q", "build", "--config", cfg, "--out", out)[0] == 0
    before = _snapshot(out)
    for args in (["build", "--config", cfg, "--out", out],  # a run is there: needs --resume
                 ["build", "--config", cfg, "--out", out, "--resume", "latest", "--rank", "17"],
                 ["train", "--out", out, "--resume", "latest", "--set", "train.nope=1"],
                 ["collect", "--out", out]):
        code, _, err = cli(*args)
        assert code == 2, (args, err)
        _one_line(err)
    assert _snapshot(out) == before


def test_cli_process_reports_one_line(tiny_flux, tmp_path):
    """The real process: exit code 2, one stderr line, no output directory."""
    cfg = write_config(tmp_path, tiny_flux)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "trainer", "build", "--config", str(cfg), "--out", str(out),
                           "--set", "select.bogus=1"], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'select.bogus'" in _one_line(proc.stderr)
    assert not out.exists()
    proc = subprocess.run([sys.executable, "-m", "trainer", "build", "--no-such-flag"], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--no-such-flag" in _one_line(proc.stderr)


def test_failed_training_leaves_no_adapter(tiny_flux, tmp_path, cli, monkeypatch):
    """A runtime failure mid-training: exit code 1, checkpoints kept, no (partial) adapter file."""
    import trainer.train as train

    cfg = write_config(tmp_path, tiny_flux, steps=6, checkpoint_every=2)
    out = tmp_path / "run"
    real = train.Trainer.train_step

    def failing(self):
        if self.step == 3:
            raise RuntimeError("simulated device failure")
        return real(self)

    monkeypatch.setattr(train.Trainer, "train_step", failing)
    code, _, err = cli("-q", "build", "--config", cfg, "--out", out)
    assert code == 1 and "simulated device failure" in _one_line(err)
    assert not (out / "adapter.safetensors").exists()
    assert not list(out.rglob("*.tmp")) and not list((out / "checkpoints").glob(".*"))
    assert [d.name for d in (out / "checkpoints").iterdir()] == ["step-00000002"]
    assert "simulated device failure" in (out / "logs/build.log").read_text()  # the traceback is in the log
    monkeypatch.setattr(train.Trainer, "train_step", real)
    code, _, err = cli("-q", "build", "--config", cfg, "--out", out, "--resume", "latest")
    assert code == 0, err
    assert (out / "adapter.safetensors").is_file()


@pytest.mark.parametrize("command", ["", "build", "collect", "select", "train", "evaluate", "generate", "convert",
                                     "inspect"])
def test_help_teaches_with_an_example(command, cli):
    code, out, _ = cli(*([command] if command else []), "--help")
    assert code == 0
    assert "example" in out.lower() and "python -m trainer" in out
