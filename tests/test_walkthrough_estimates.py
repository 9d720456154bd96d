"""The README walkthrough's estimates: exact parameter counts, the FLOP model, and the script's output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_parameter_counts_are_flux1_devs():
    pytest.importorskip("diffusers")
    from walkthrough_estimates import count_parameters, flops_per_call

    p = count_parameters()
    # The FLUX.1-dev release: 11.9 B transformer, T5-XXL encoder, CLIP ViT-L/14 text model, the 16-channel VAE.
    assert p == {"transformer": 11_901_408_320, "t5": 4_762_310_656, "clip": 123_060_480, "vae": 83_819_683,
                 "transformer_per_token": 6_456_507_648}
    assert flops_per_call(1536, p["transformer_per_token"]) == pytest.approx(2.15e13, rel=0.005)
    assert flops_per_call(4608, p["transformer_per_token"]) == pytest.approx(7.44e13, rel=0.005)


@pytest.mark.slow
def test_the_script_prints_the_readme_figures():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "walkthrough_estimates.py")], capture_output=True,
                         text=True, check=True, timeout=900).stdout
    readme = (ROOT / "README.md").read_text()
    for line in ("54 ms at 400 TFLOP/s", "186 ms", "double block 0.228 GB, single block 0.209 GB", "0.58 MB"):
        assert line in out, line
    assert "0.228 GB per\n  double block, 0.209 GB per single block" in readme
