"""Runs every model family's tiny model through the SafeRoPE pack inside a real ComfyUI; writes JSON.

    $COMFYUI_PYTHON tests/comfy/family_driver.py --comfyui $COMFYUI_PATH --work DIR --out DIR/families.json

Started by ``test_comfy_families.py`` in a child process (like ``comfy_driver.py``: the test
runner's ``sys.path`` never reaches ComfyUI, whose top-level ``nodes`` would clash with the
pack's). The pack is loaded by ComfyUI's own custom-node loader from ``DIR/base/custom_nodes``.
For each case of ``family_models.TINIES`` whose classes this tree has, every scenario of
``family_scenarios.py`` runs and records plain data (exact max-abs differences, error types and
messages); the tests assert on it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

import comfy_boot  # noqa: E402  (helpers next to this script, imported before ComfyUI)
import family_models  # noqa: E402
import family_scenarios  # noqa: E402
import family_table  # noqa: E402

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in (HERE, REPO)]  # keep ComfyUI's namespace clean
logger = logging.getLogger("family_driver")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--cases", nargs="*", default=None, help="run only these cases")
    ap.add_argument("--scenarios", nargs="*", default=None, help="run only these scenarios")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tree = Path(a.comfyui)
    booted = comfy_boot.boot(a.comfyui, a.work, [("comfyui-saferope", REPO)])
    results: dict = {"boot": booted, "version": family_table.version(tree),
                     "families": family_table.families_in(tree), "unsupported": family_table.unsupported_in(tree),
                     "cases": {}}
    import comfy.utils
    import torch

    comfy.utils.PROGRESS_BAR_ENABLED = False  # KSampler's tqdm bars: noise in the captured stderr
    torch.manual_seed(0)
    env = family_scenarios.Env.create(a.work)
    present = set(results["families"]) | set(results["unsupported"])
    for case, tiny in family_models.TINIES.items():
        if (tiny.family or case) not in present or (a.cases and case not in a.cases):
            continue
        out: dict = {}
        results["cases"][case] = out
        t0 = time.time()
        try:
            with torch.inference_mode():  # as ComfyUI's executor runs every node
                ctx = family_scenarios.Case.create(env, tiny)
        except Exception as e:  # noqa: BLE001 - recorded: every test of the case reports it
            out["setup"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            continue
        out["setup"] = {**ctx.info, "seconds": round(time.time() - t0, 2)}
        for name, fn in family_scenarios.SCENARIOS.items():
            if (a.scenarios and name not in a.scenarios) or not family_scenarios.applies(name, ctx):
                continue
            t = time.time()
            try:
                with torch.inference_mode():
                    out[name] = fn(ctx)
            except Exception as e:  # noqa: BLE001 - recorded for the test that owns the scenario
                out[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            out[name]["seconds"] = round(time.time() - t, 2)
        logger.warning("case %s: %.1f s", case, time.time() - t0)
    a.out.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
