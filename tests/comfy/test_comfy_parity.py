"""Same math, two hosts: ComfyUI with the nodes vs diffusers with the engine integration, same weights."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.comfyui


def test_base_models_agree(driver, scenario):
    r = scenario("parity")["base"]
    assert r["max_abs"] <= 1e-5 * max(1.0, r["scale"])


@pytest.mark.parametrize("case", ["main", "stack"])
def test_protected_models_agree(driver, scenario, case):
    r = scenario("parity")[case]
    assert r["max_abs"] <= 1e-5 * max(1.0, r["scale"])
    assert r["delta_norm"] > 1e-3  # SafeRoPE changed the output ...
    assert r["delta_rel"] <= 1e-3  # ... by the same amount in both hosts


def test_stacked_adapters_differ_from_one(driver, scenario):
    assert scenario("parity")["stack_vs_main"] > 0.0
