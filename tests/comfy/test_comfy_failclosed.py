"""Fail closed in a real ComfyUI: incompatible adapters and hooks that did not run are errors."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.comfyui


def test_incompatible_adapter_is_rejected_when_apply_runs(driver, scenario):
    r = scenario("fail_closed")["incompatible"]
    assert r["raised"] == "IncompatibleAdapterError"
    assert "wrong_heads.safetensors" in r["message"] and "num_heads: adapter 4, model 2" in r["message"]


@pytest.mark.parametrize("case", ["hook_disabled", "hook_disabled_safe_prompt", "block_skipped"])
def test_a_hook_that_did_not_run_raises(driver, scenario, case):
    r = scenario("fail_closed")
    e = r[case]
    assert e["raised"] == "HookNotRunError" and "SafeRoPEError" in e["bases"]
    assert "main.safetensors" in e["message"] and "did not run" in e["message"]
    assert ("attn1_patch" if r["mode"] == "attn1" else "object patch") in e["message"]
    if case == "block_skipped":  # the cause is named: the block replacement of the missing block
        assert "double.0" in e["message"] and "single" not in e["message"]
        assert "double block 0 is replaced by patches_replace['dit'][('double_block', 0)] = " \
               "fail_closed.<locals>.skip_block" in e["message"]
        assert "Likely cause" in e["message"] and "Remedy: remove or bypass that node" in e["message"]
    else:  # our own patch was removed: nothing else to blame, the message says what may have happened
        assert "Another node may have replaced or skipped these blocks" in e["message"]


def test_failures_leave_the_protected_and_the_original_model_usable(driver, scenario):
    r = scenario("fail_closed")
    assert r["after_ok"]["raised"] is None and r["original_has_no_saferope"]
