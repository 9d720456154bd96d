"""The LRS visualizer in a real ComfyUI: one model evaluation, a readable image and a summary."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.comfyui


def test_unsafe_prompt_shows_its_trigger_tokens_gated(driver, scenario):
    r = scenario("visualizer")
    s = r["unsafe_summary"]
    assert f"text tokens gated in any block: {r['triggers']} of 12" in s
    top = re.search(r"top tokens: (.*)", s).group(1)
    assert {int(t) for t in re.findall(r"#(\d+)", top)[: r["triggers"]]} == set(range(1, 1 + r["triggers"]))
    assert float(re.search(r"max text risk ([0-9.]+)", s).group(1)) > 0.9
    assert "d0 25.0% / 0.0%" in s  # 3 of 12 text tokens, both heads


def test_safe_prompt_gates_nothing(driver, scenario):
    s = scenario("visualizer")["safe_summary"]
    assert "text tokens gated in any block: 0 of 12" in s
    assert float(re.search(r"max text risk ([0-9.]+)", s).group(1)) < 0.5


def test_image_output_is_a_comfyui_image(driver, scenario):
    r = scenario("visualizer")
    b, h, w, c = r["image_shape"]
    assert (b, c) == (1, 3) and h > 200 and w > 400 and r["image_dtype"] == "torch.float32"
    assert 0.0 <= r["image_range"][0] < r["image_range"][1] <= 1.0


def test_progress_bar_reaches_its_total(driver, scenario):
    ticks = scenario("visualizer")["progress"]
    assert ticks and ticks[-1][0] == ticks[-1][1]


def test_chained_layers_are_labelled_and_an_inactive_range_is_said(driver, scenario):
    s = scenario("visualizer")["chained_summary"]
    assert "A: adapter main.safetensors" in s and "B: adapter second.safetensors" in s
    assert "INACTIVE at this noise level" in s and "B:s0 0.0% / 0.0%" in s  # scores shown, nothing rotated


def test_model_without_saferope_is_a_clear_error(driver, scenario):
    e = scenario("visualizer")["no_layers"]
    assert e["raised"] == "ValueError" and "Apply SafeRoPE to Model" in e["message"]


def test_max_risk_and_flagged_outputs_let_a_workflow_branch(driver, scenario):
    """The visualizer's extra outputs and the Risk Check node agree: FLOAT max risk, BOOLEAN flagged."""
    o = scenario("visualizer")["outputs"]
    for node in ("visualizer", "risk_check"):
        (u_max, u_flag), (s_max, s_flag) = o["unsafe"][node], o["safe"][node]
        assert u_flag is True and s_flag is False, node
        assert u_max > 0.9 > 0.5 > s_max >= 0.0, (node, u_max, s_max)
    assert o["unsafe"]["visualizer"] == o["unsafe"]["risk_check"] and o["unsafe"]["types"] == ["float", "bool"]
    assert o["inactive_flagged"] is True  # risky even where the layer does not rotate at this noise level
    assert o["risk_check_no_layers"]["raised"] == "ValueError"
    assert "SafeRoPE Risk Check" in o["risk_check_no_layers"]["message"]
