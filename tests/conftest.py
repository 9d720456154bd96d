"""Shared test fixtures: an offline tiny FLUX pipeline and CLI helpers.

Everything runs offline on the CPU; the tiny pipeline (``tests/tiny_pipeline.py``) is built in
code once per session.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Offline, quiet libraries, and never a download — before diffusers/transformers are imported.
for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS"):
    os.environ.setdefault(_key, "1")

_TESTS = Path(__file__).resolve().parent
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))
_ROOT = _TESTS.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """A tiny FLUX pipeline folder (2+2 blocks, 2 heads × 16, 16×16 images, 12 T5 tokens)."""
    pytest.importorskip("diffusers", reason="the trainer tests need the `trainer` extra (diffusers)")
    pytest.importorskip("transformers", reason="the trainer tests need the `trainer` extra (transformers)")
    from tiny_pipeline import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux") / "model")


@pytest.fixture
def single_thread():
    """One intra-op thread: tiny models run many times faster on a shared 2-core machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def cli(capsys):
    """Run ``python -m trainer ARGS`` in-process; returns ``(exit_code, stdout, stderr)``."""
    from trainer.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run
