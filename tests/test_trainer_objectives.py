"""Training objectives and options: deviate + flow, only generators get gradients, gradient checkpointing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from trainer_fixtures import write_config

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def collected(tiny_flux, tmp_path_factory):
    """A run directory after collect (default head kinds: double and single blocks)."""
    from trainer.cli import main

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("objectives")
    cfg = write_config(folder, tiny_flux, steps=3, extra="")
    text = cfg.read_text().replace('kinds = ["double"]', 'kinds = ["double", "single"]').replace("count = 4", "count = 6")
    cfg.write_text(text)
    out = folder / "base"
    assert main(["-q", "collect", "--config", str(cfg), "--out", str(out)]) == 0
    assert main(["-q", "select", "--out", str(out)]) == 0
    torch.set_num_threads(old)
    return out


def _image_folder(path, n=3):
    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path / f"img{i}.png")
        (path / f"img{i}.txt").write_text(f"a photo of a {['cat', 'dog', 'car'][i]}\n")
    return path


def test_deviate_with_flow_trains_only_the_generators(collected, tmp_path, cli, monkeypatch):
    import trainer.stages.train as train

    run = tmp_path / "run"
    shutil.copytree(collected, run)
    images = _image_folder(tmp_path / "images")
    seen = {}
    real = train.Trainer.train_step

    def checked(self):
        logs = real(self)
        backbone = list(self.transformer.parameters())
        seen["frozen"] = all(not p.requires_grad and p.grad is None for p in backbone)
        seen["grads"] = [float(p.grad.abs().sum()) for p in self.params.values()]
        seen["requires"] = all(p.requires_grad for p in self.params.values())
        return logs

    monkeypatch.setattr(train.Trainer, "train_step", checked)
    code, _, err = cli("-q", "train", "--out", run, "--unlearn", "deviate", "--preserve", "flow", "--images", images,
                       "--set", "train.threshold=0.5")
    assert code == 0, err
    assert seen["frozen"] and seen["requires"] and max(seen["grads"]) > 0
    metrics = json.loads((run / "metrics.json").read_text())["train"]
    assert set(metrics["final"]) >= {"unlearn", "preserve", "loss"}
    assert -1.0 <= metrics["final"]["unlearn"] <= 0.0  # tanh(−MSE)
    assert list((run / "cache").glob("images-*.safetensors"))
    from saferope_engine import load_adapter

    adapter = load_adapter(run / "adapter.safetensors")
    assert adapter.meta.config["config"]["train"]["unlearn"] == "deviate"
    assert any(kind == "single" for kind, _ in adapter.blocks)


def test_gradient_checkpointing_gives_the_same_generators(collected, tmp_path, cli):
    """Recomputation in backward (single blocks included) reproduces the plain run."""
    from saferope_engine import load_adapter

    results = []
    for flag in ([], ["--gradient-checkpointing"]):
        run = tmp_path / f"run{len(flag)}"
        shutil.copytree(collected, run)
        code, _, err = cli("-q", "train", "--out", run, *flag)
        assert code == 0, err
        a = load_adapter(run / "adapter.safetensors")
        results.append({b.key: b.A_txt for b in a.blocks.values()})
    assert any(k.startswith("single") for k in results[0])
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=1e-5, atol=1e-7)
    assert max(float(t.abs().max()) for t in results[0].values()) > 0


def test_mixed_precision_run_produces_a_valid_adapter(collected, tmp_path, cli):
    from saferope_engine import load_adapter

    run = tmp_path / "bf16"
    shutil.copytree(collected, run)
    code, _, err = cli("-q", "train", "--out", run, "--mixed-precision", "bf16", "--steps", "2")
    assert code == 0, err
    adapter = load_adapter(run / "adapter.safetensors")
    assert all(b.A_txt.dtype == torch.float32 for b in adapter.blocks.values())
