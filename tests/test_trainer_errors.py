"""Bad inputs: a one-line error, a non-zero exit code, and nothing written to the output directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_fixtures import subprocess_env, write_config

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


def _truncated_weights(tiny_flux: Path, tmp: Path, sub: str = "transformer") -> Path:
    """A copy of the model whose ``sub`` weights lost their last 100 bytes (an interrupted download)."""
    broken = tmp / f"truncated-{sub}"
    shutil.copytree(tiny_flux, broken)
    (weights,) = (broken / sub).glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:-100])
    return broken


def _pickle_only(tiny_flux: Path, tmp: Path) -> Path:
    broken = tmp / "pickle-model"
    shutil.copytree(tiny_flux, broken)
    (weights,) = (broken / "text_encoder").glob("*.safetensors")
    weights.rename(weights.with_name("pytorch_model.bin"))
    return broken


def _sharded_missing(tiny_flux: Path, tmp: Path) -> Path:
    """A sharded transformer whose index names a shard that is not there."""
    import json

    broken = tmp / "sharded-model"
    shutil.copytree(tiny_flux, broken)
    (weights,) = (broken / "transformer").glob("*.safetensors")
    weights.rename(weights.with_name("diffusion_pytorch_model-00001-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                                            "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    (broken / "transformer/diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
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
    "truncated transformer weights": (lambda d, m: ["--model", _truncated_weights(m, d)],
                                      "transformer/diffusion_pytorch_model.safetensors:"),
    "truncated T5 weights": (lambda d, m: ["--model", _truncated_weights(m, d, "text_encoder_2")],
                             "text_encoder_2/model.safetensors:"),
    "pickle-only weights": (lambda d, m: ["--model", _pickle_only(m, d)], "only pickle weights (pytorch_model.bin)"),
    "missing shard": (lambda d, m: ["--model", _sharded_missing(m, d)],
                      "00002-of-00002.safetensors is missing (named in the weights index)"),
    "directory as a prompt file": (lambda d, m: ["--safe", _mkdir(d / "prompts-dir")], "is a directory, not a prompt file"),
    "NUL byte in a prompt file": (lambda d, m: ["--safe", _write(d / "nul.txt", "a cat\na d\x00og\n")],
                                  "nul.txt' line 2: NUL (U+0000) at column 4"),
    "carriage return inside a line": (lambda d, m: ["--safe", _write(d / "cr.txt", "a cat\ra dog\n")],
                                      "cr.txt' line 1: carriage return (U+000D)"),
    "truncated image for flow": (lambda d, m: _images(d / "imgs", truncate=True), "img.png' is not a readable image"),
    "NUL in a caption": (lambda d, m: _images(d / "imgs", caption="a c\x00at\n"),
                         "img.txt' holds a control character (U+0000)"),
}


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))  # bytes as given (no newline translation)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _images(folder: Path, *, truncate: bool = False, caption: str = "a photo of a cat\n") -> list:
    """Flags for the flow objective on a one-image folder (optionally a truncated PNG or a bad caption)."""
    import numpy as np
    from PIL import Image

    folder.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(folder / "img.png")
    if truncate:
        data = (folder / "img.png").read_bytes()
        (folder / "img.png").write_bytes(data[: len(data) // 2])
    _write(folder / "img.txt", caption)
    return ["--preserve", "flow", "--images", folder]


#: Numbers that used to be accepted and poison the run directory: (flags, the config key named).
BAD_NUMBERS = {
    "lr nan": (["--lr", "nan"], "'train.lr' must be > 0 (a finite number), got nan"),
    "lr inf": (["--lr", "inf"], "'train.lr' must be > 0 (a finite number), got inf"),
    "lr 0": (["--lr", "0"], "'train.lr' must be > 0, got 0.0"),
    "lambda-unlearn nan": (["--lambda-unlearn", "nan"], "'train.lambda_unlearn'"),
    "lambda-preserve -1": (["--lambda-preserve", "-1"], "'train.lambda_preserve' must be ≥ 0, got -1.0"),
    "guidance nan": (["--guidance", "nan"], "'guidance' must be ≥ 0 (a finite number), got nan"),
    "init_std inf": (["--set", "train.init_std=inf"], "'train.init_std' must be ≥ 0 (a finite number, or nan = unused)"),
    "margin inf": (["--set", "select.margin=inf"], "'select.margin' must be a finite number, or nan = unused, got inf"),
    "margin -inf": (["--margin=-inf"], "'select.margin'"),
    "threshold inf": (["--threshold", "inf"], "'train.threshold' must be in [0, 1)"),
    "weight_decay nan": (["--set", "train.weight_decay=nan"], "'train.weight_decay'"),
    "sigma nan": (["--sigmas", "1,nan"], "'collect.sigmas[1]' must be in (0, 1]"),
    "unlearn sigma inf": (["--set", "train.unlearn_sigmas=[0.5, inf]"], "'train.unlearn_sigmas[1]'"),
    "contrast weight nan": (["--set", "select.contrast_weight=nan"], "'select.contrast_weight' must be in [0, 1]"),
    "fraction inf": (["--fraction", "inf"], "'select.fraction'"),
    "concept with an undecodable byte": (["--concept", "zorb\udcfflax"], "'concepts[0]' contains an undecodable"),
}


@pytest.mark.parametrize("existing", [False, True], ids=["new --out", "existing run"])
@pytest.mark.parametrize("case", list(BAD_NUMBERS))
def test_meaningless_numbers_are_rejected_before_anything_is_written(case, existing, finished_run, tmp_path, cli):
    """Exit 2, one line naming the key; a new --out is not created, an existing run is not modified
    (its resolved config never holds the value, so a rerun and a resume still work)."""
    folder, cfg, built = finished_run
    flags, needle = BAD_NUMBERS[case]
    if existing:
        out = tmp_path / "run"
        shutil.copytree(built, out)
        before = _snapshot(out)
        args = ["build", "--config", cfg, "--out", out, "--resume", "latest", *flags]
    else:
        out, before = tmp_path / "new", None
        args = ["build", "--config", cfg, "--out", out, *flags]
    code, stdout, err = cli(*args)
    assert code == 2, err
    assert needle in _one_line(err)
    assert _snapshot(out) == before and not stdout


@pytest.fixture(scope="module")
def finished_run(tiny_flux, tmp_path_factory):
    """``(folder, config, run)``: a finished 2-step build (do not modify; copy it)."""
    from trainer.cli import main

    folder = tmp_path_factory.mktemp("errors")
    cfg = write_config(folder, tiny_flux, steps=2, checkpoint_every=1)
    out = folder / "built"
    assert main(["-q", "build", "--config", str(cfg), "--out", str(out)]) == 0
    return folder, cfg, out


def test_a_poisoned_resolved_config_is_named(finished_run, tmp_path, cli):
    """A run directory written by an older trainer with `lr = nan` in it: resume names the key (exit 2)."""
    _, _, built = finished_run
    out = tmp_path / "run"
    shutil.copytree(built, out)
    resolved = out / "config.resolved.toml"
    resolved.write_text(resolved.read_text().replace("lr = 0.05", "lr = nan"))
    before = _snapshot(out)
    code, _, err = cli("train", "--out", out, "--resume", "latest")
    assert code == 2 and "'train.lr' must be > 0 (a finite number), got nan" in _one_line(err)
    assert _snapshot(out) == before


def _unwritable(tmp: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root may write into any directory")
    folder = tmp / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "run"


OUT_CASES = {
    "an existing file": (lambda d: _write(d / "a-file", "keep me\n"), "exists and is not a directory"),
    "below a file": (lambda d: _write(d / "a-file", "keep me\n") / "run", "/a-file' is not a directory"),
    "under /proc": (lambda d: Path("/proc/saferope-x/run"), "cannot create a directory in '/proc'"),
    "in a read-only directory": (_unwritable, "cannot create a directory in"),
}


@pytest.mark.parametrize("case", [c for c in OUT_CASES if c != "in a read-only directory"])
def test_demo_with_an_unusable_out_is_one_line_exit_2(case, tmp_path, cli):
    make, needle = OUT_CASES[case]
    out = make(tmp_path)
    before = _snapshot(tmp_path)
    code, stdout, err = cli("demo", "--quick", "--out", out)
    assert code == 2 and needle in _one_line(err), err
    assert _snapshot(tmp_path) == before and not stdout


@pytest.mark.parametrize("case", list(OUT_CASES))
def test_unusable_out_is_one_line_exit_2(case, tiny_flux, tmp_path, cli):
    cfg = write_config(tmp_path, tiny_flux)
    make, needle = OUT_CASES[case]
    out = make(tmp_path)
    before = _snapshot(tmp_path)
    code, stdout, err = cli("build", "--config", cfg, "--out", out)
    assert code == 2, err
    assert needle in _one_line(err)
    assert _snapshot(tmp_path) == before and not stdout


def test_out_that_refuses_a_new_directory_is_named(tmp_path, monkeypatch):
    """A parent where mkdir fails (here: simulated EACCES, as a read-only folder gives a non-root user)."""
    import tempfile

    from trainer.core.errors import UsageError
    from trainer.core.rundir import check_output_dir

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(UsageError, match=r"--out '.*/run': cannot create a directory in '.*' \(Permission denied\)"):
        check_output_dir(tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--strength", "nan"], "--strength must be a finite number ≥ 0, got nan"),
    (["--strength", "1", "--strength", "inf"], "--strength must be a finite number ≥ 0"),
    (["--guidance", "nan"], "--guidance must be a finite number ≥ 0, got nan"),
    (["--out", "/proc/saferope-x/img.png"], "cannot create a directory in '/proc'"),
])
def test_generate_rejects_bad_numbers_and_outputs(flags, needle, tiny_flux, tmp_path, cli):
    args = ["generate", "--model", tiny_flux, "--prompt", "a cat", "--out", tmp_path / "img.png", *flags]
    code, stdout, err = cli(*args)
    assert code == 2, err
    assert needle in _one_line(err)
    assert not (tmp_path / "img.png").exists() and not stdout


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
    import trainer.stages.train as train

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
