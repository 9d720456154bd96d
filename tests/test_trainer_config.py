"""Config files, flag overrides, validation, and prompt-file parsing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from trainer.core.config import RunConfig, diff_fingerprints, fingerprint, init_std, parse_value, rollout_grid, to_toml
from trainer.core.errors import UsageError
from trainer.core.prompts import read_eval, read_prompts, read_unlearn
from trainer.resolve import resolve


def _toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_file_then_flags_and_relative_paths(tmp_path):
    sub = tmp_path / "cfg"
    sub.mkdir()
    cfg_file = _toml(sub / "c.toml", 'model = "toy"\nout = "runs/x"\n[prompts]\nunsafe = "u.txt"\n'
                                     '[train]\nsteps = 50\nlr = 1\n[evaluate.sets]\nred = "red.txt"\n')
    cfg = resolve(config_file=str(cfg_file), overrides={"train.steps": 7, "select.rank": 3, "prompts.safe": "s.txt"})
    assert cfg.train.steps == 7 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.select.rank == 3 and cfg.model == "toy"
    assert cfg.prompts.unsafe == str(sub / "u.txt") and cfg.out == str(sub / "runs/x")  # relative to the file
    assert cfg.prompts.safe == str(Path.cwd() / "s.txt")  # flags: relative to the working directory
    assert cfg.evaluate.sets == {"red": str(sub / "red.txt")}


@pytest.mark.parametrize("text, needle", [
    ("stepz = 3\n", "unknown config key 'stepz'"),
    ("[train]\nstepz = 3\n", "unknown config key 'train.stepz'"),
    ("[trian]\nsteps = 3\n", "unknown config key 'trian'"),
    ("[train]\nsteps = 2.5\n", "'train.steps': expected an integer"),
    ("[collect]\nsigmas = 0.5\n", "'collect.sigmas': expected a list"),
    ("train = 3\n", "'train' must be a table"),
    ("[train]\nunlearn = \"forget\"\n", "not one of anchor, deviate, none"),
    ("[train]\nthreshold = 1.0\n", "'train.threshold' must be in [0, 1)"),
    ("[train]\nunlearn_sigmas = [0.9, 0.2]\n", "'train.unlearn_sigmas' must be [min, max]"),
    ("[select]\ncount = 0\n", "needs 'select.count', 'select.fraction' or 'select.margin'"),
    ("[train]\nrollout_steps = 2\nunlearn_sigmas = [0.6, 0.9]\n", "contains no rollout grid point"),
    ("model = \n", "config file"),
])
def test_bad_config_is_rejected_by_name(tmp_path, text, needle):
    with pytest.raises(UsageError) as e:
        resolve(config_file=str(_toml(tmp_path / "c.toml", text)))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unknown_override_and_missing_file(tmp_path):
    with pytest.raises(UsageError, match="unknown config key 'select.nope'"):
        resolve(overrides={"select.nope": 1})
    with pytest.raises(UsageError, match="not found"):
        resolve(config_file=str(tmp_path / "none.toml"))


def test_resolved_toml_round_trips(tmp_path):
    cfg = RunConfig(model="toy", out=str(tmp_path / "o"), concepts=["red", "crimson \"x\""])
    cfg.evaluate.sets = {"explicit": "/a/b.txt", "with space": "/c.txt"}
    cfg.train.init_std = 0.25
    text = to_toml(cfg)
    back = resolve(run_config=_toml(tmp_path / "r.toml", text))
    assert back.to_dict() == cfg.to_dict() or _same_with_nan(back.to_dict(), cfg.to_dict())
    assert math.isnan(back.select.margin)


def _same_with_nan(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_with_nan(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def test_helpers():
    assert parse_value("3") == 3 and parse_value("[1, 2]") == [1, 2] and parse_value("hello") == "hello"
    assert parse_value("true") is True
    assert rollout_grid(4, [0.5, 1.0]) == [1.0, 0.75, 0.5]
    cfg = RunConfig()
    assert init_std(cfg.train) == 0.0
    cfg.train.unlearn = "deviate"
    assert init_std(cfg.train) > 0  # its gradient vanishes at the identity
    a = fingerprint(cfg, ["seed", "train"])
    cfg.train.lr = 1.0
    assert diff_fingerprints(a, fingerprint(cfg, ["seed", "train"])) == ["train.lr"]


def test_prompt_files(tmp_path):
    p = _toml(tmp_path / "u.txt", "# comment\n\na red circle\tа blue circle\n  a crimson square\ta blue square \n")
    u = read_unlearn(p, need_anchors=True)
    assert u.prompts == ["a red circle", "a crimson square"] and u.anchors == ["а blue circle", "a blue square"]
    plain = _toml(tmp_path / "p.txt", "one\ntwo\n")
    anchors = _toml(tmp_path / "a.txt", "uno\n")
    with pytest.raises(UsageError, match="has 1 prompts, the unsafe file .* has 2"):
        read_unlearn(plain, anchors)
    with pytest.raises(UsageError, match="needs a safe rewrite"):
        read_unlearn(plain, need_anchors=True)
    assert read_unlearn(plain).anchors is None
    mixed = _toml(tmp_path / "m.txt", "one\tuno\ntwo\n")
    with pytest.raises(UsageError, match="line 2"):
        read_unlearn(mixed)
    with pytest.raises(UsageError, match="unexpected tab"):
        read_prompts(mixed, what="safe prompts")
    with pytest.raises(UsageError, match="no prompts"):
        read_prompts(_toml(tmp_path / "e.txt", "# nothing\n   \n"), what="safe prompts")
    items = read_eval(_toml(tmp_path / "ev.txt", "a red circle\tcolour=red, shape=circle\nplain\n"), what="set")
    assert items[0].labels == {"colour": "red", "shape": "circle"} and items[1].labels == {}
    with pytest.raises(UsageError, match="key=value"):
        read_eval(_toml(tmp_path / "bad.txt", "x\tred\n"), what="set")


def test_model_resolution(tiny_flux, tmp_path, monkeypatch):
    """Local folders, hub ids from the local cache (never downloaded), toy, and layout errors."""
    import shutil

    import huggingface_hub.constants as hf_constants

    from saferope_engine import ModelShapes
    from trainer.families.models import image_size, max_sequence_length, resolve_model

    info = resolve_model(str(tiny_flux))
    assert info.shapes == ModelShapes("flux1", 2, 16, {"double": 2, "single": 2})
    assert max_sequence_length(info, 0) == 12 and image_size(info, 0, 0) == (16, 16)
    with pytest.raises(UsageError, match="exceeds the model's T5 limit 12"):
        max_sequence_length(info, 13)
    with pytest.raises(UsageError, match="multiples of 4"):
        image_size(info, 18, 16)
    # A hub id present in the local cache (the hub's cache layout), resolved offline.
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-flux"
    shutil.copytree(tiny_flux, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    hub = resolve_model("someone/tiny-flux")
    assert hub.path == repo / "snapshots" / "0123abcd" and hub.name == "someone/tiny-flux"
    with pytest.raises(UsageError, match="not in the local Hugging Face cache"):
        resolve_model("someone/absent")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_flux, broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(UsageError, match="no tokenizer_2/ folder"):
        resolve_model(str(broken))


def test_toy_model_comes_from_trainer_toy(tiny_flux, monkeypatch):
    """``--model toy`` is the name the toy world registers (trainer.toy.register_extension, as any extension);
    without the toy world the error says so in one line."""
    import sys
    import types

    import trainer.extensions as extensions
    from trainer.families import models

    monkeypatch.setattr(models, "NAMED_MODELS", {})
    monkeypatch.setattr(extensions, "_loaded", {})
    fake = types.ModuleType("trainer.toy")
    fake.register_extension = lambda: models.register_model("toy", tiny_flux)
    monkeypatch.setitem(sys.modules, "trainer.toy", fake)
    info = models.resolve_model("toy")
    assert info.path == tiny_flux and info.name == "toy"
    monkeypatch.setattr(models, "NAMED_MODELS", {})
    monkeypatch.setattr(extensions, "_loaded", {})
    monkeypatch.setitem(sys.modules, "trainer.toy", None)  # not installed
    with pytest.raises(UsageError, match="MODEL 'toy': the toy model is not available"):
        models.resolve_model("toy")
