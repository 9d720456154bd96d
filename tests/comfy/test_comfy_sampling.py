"""Sampling a tiny FLUX (head dim 128) with and without the nodes, in a real ComfyUI."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.comfyui


def test_outputs_change_only_when_the_gate_fires(driver, scenario):
    r = scenario("protect")
    assert r["safe_vs_base"] == 0.0  # no token above threshold: bit-identical
    assert r["unsafe_vs_base"] > 1e-3 * r["base_unsafe_scale"]  # trigger tokens gated: the image changes
    assert r["protected_repeat"] == 0.0  # deterministic


def test_original_model_is_left_exactly_as_it_was(driver, scenario):
    r = scenario("protect")
    assert r["clone_is_new"] and r["original_state_unchanged"]
    assert r["original_after_safe"] == 0.0 and r["original_after_unsafe"] == 0.0  # bit-identical after sampling the clone


def test_strength_zero_equals_base(driver, scenario):
    r = scenario("strength_zero")
    assert r["strength0_vs_base"] == 0.0 and r["strength1_vs_base"] > 0.0
    assert r["threshold_099_vs_base"] == 0.0  # a threshold above every score gates nothing


def test_two_apply_nodes_apply_both_adapters_in_order(driver, scenario):
    r = scenario("chain")
    assert r["disjoint_chain_vs_union"] == 0.0  # Apply(double blocks) -> Apply(single blocks) == one adapter with both
    assert r["one_vs_union"] > 0.0
    assert r["ab_vs_main"] > 0.0  # the second adapter acts after the first
    assert r["order_ab_vs_ba"] > 0.0  # and order matters (non-commuting rotations)


def test_start_end_percent_limit_the_sampling_range(driver, scenario):
    r = scenario("sampling_range")
    assert r["never_vs_base"] == 0.0  # range [1, 1]: never active, and not a failure
    assert r["late_vs_base"] > 0.0 and r["late_vs_full"] > 0.0
    assert r["start_after_end"]["raised"] == "ValueError" and "start_percent" in r["start_after_end"]["message"]


def test_cond_uncond_batches_prompt_lengths_resolutions_and_reference_tokens(driver, scenario):
    r = scenario("shapes")
    assert r["lengths_safe_vs_base"] == 0.0 and r["lengths_unsafe_vs_base"] > 0.0
    assert r["unsafe_negative_only_vs_base"] > 0.0  # the uncond row of the batch is protected too
    assert r["odd_size_safe_vs_base"] == 0.0 and r["odd_size_unsafe_vs_base"] > 0.0
    assert r["kontext_vs_plain"] > 0.0  # the reference latent reached the model
    assert r["kontext_safe_vs_base"] == 0.0 and r["kontext_unsafe_vs_base"] > 0.0
    # 64x64 -> 4x4 image tokens + 4x6 latent reference -> 2x3 tokens, all after the 12 text tokens
    assert "12 text tokens, 22 image tokens" in r["kontext_summary"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float8_e4m3fn", "float8_e5m2"])
def test_low_precision_model_weights(driver, scenario, dtype):
    r = scenario("dtypes")[dtype]
    assert "error" not in r, r.get("error")
    assert r["weight_dtype"] == f"torch.{dtype}"
    assert r["finite"] and r["unsafe_vs_base"] > 0.0
    assert r["safe_vs_base"] == 0.0 and r["strength0_vs_base"] == 0.0


def test_next_to_lora_and_other_patches(driver, scenario):
    r = scenario("neighbours")
    assert r["lora_changes_base"] > 0.0
    assert r["lora_protected_safe_vs_lora"] == 0.0 and r["lora_protected_unsafe_vs_lora"] > 0.0
    assert r["lora_after"] == 0.0
    assert r["object_neighbour_vs_object_alone"] == 0.0 and r["calls"]["norm"] > 0  # a foreign norm patch kept, run
    if driver["info"]["attn1"]:  # other attn1_patch users before and after ours, with either hook of ours
        assert r["attn1_neighbours_vs_alone[object]"] == 0.0 and r["attn1_neighbours_vs_alone[attn1]"] == 0.0
        assert r["calls"]["before"] > 0 and r["calls"]["after"] > 0
    else:
        assert not any(k.startswith("attn1_neighbours") for k in r)


def test_object_patches_are_the_hook_and_attn1_agrees_where_the_blocks_call_it(driver, scenario):
    r = scenario("object_mode")
    assert r["auto_mode"] == "object" and r["object_patches"] > 0
    assert r["auto_safe_vs_base"] == 0.0 and r["auto_unsafe_vs_base"] > 0.0
    if driver["info"]["attn1"]:
        assert r["attn1_forced"]["raised"] is None
        assert r["attn1_vs_auto"] <= 1e-5 and r["attn1_safe_vs_base"] == 0.0
    else:
        assert r["attn1_forced"]["raised"] == "SafeRoPEError" and "attn1_vs_auto" not in r
