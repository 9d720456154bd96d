"""Runs the SafeRoPE pack inside a real ComfyUI and writes what it observed as JSON.

    $COMFYUI_PYTHON tests/comfy/comfy_driver.py --comfyui $COMFYUI_PATH --work DIR --out DIR/results.json

Started by the ComfyUI-backed tests (tests/comfy/conftest.py) in a separate process, so that the
test runner's ``sys.path`` (which may hold the repository root) never reaches ComfyUI, whose
top-level module ``nodes`` would clash with the pack's ``nodes`` package. The pack is loaded by
ComfyUI's own custom-node loader from ``DIR/base/custom_nodes`` (a symlink to the repository),
next to the test-only node pack ``support_nodes``. Each scenario's observations (numbers, error
types and messages) go to the JSON file; the tests assert on them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

import comfy_boot  # noqa: E402  (helpers next to this script, imported before ComfyUI)
import driver_assets  # noqa: E402
import driver_compat  # noqa: E402,F401  (registers the compatibility scenarios, run after the others)
import driver_scenarios  # noqa: E402
import trees  # noqa: E402

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in (HERE, REPO)]  # keep ComfyUI's namespace clean


def boot(comfy_path: str, work: Path) -> dict:
    """ComfyUI with the pack, the test-only ``support_nodes`` and the third-party packs present."""
    packs = trees.nodepacks_dir()
    links = [("comfyui-saferope", REPO), ("saferope_test_support", HERE / "support_nodes")]
    links += [(p.folder, packs / p.folder) for p in trees.PACKS.values() if (packs / p.folder).is_dir()]
    info = comfy_boot.boot(comfy_path, work, links)
    import nodes  # ComfyUI's, loaded by the boot

    loaded = getattr(nodes, "LOADED_MODULE_DIRS", {})
    third_party = {key: {"folder": p.folder, "present": (packs / p.folder).is_dir(), "loaded": p.folder in loaded}
                   for key, p in trees.PACKS.items()}
    return {**info, "nodepacks": str(packs), "third_party": third_party}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--only", nargs="*", default=None, help="run only these scenarios")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    results: dict = {"boot": boot(a.comfyui, a.work)}
    ctx = driver_scenarios.Context.create(a.work, driver_assets)
    results["info"] = ctx.info()
    import torch

    for name, fn in driver_scenarios.SCENARIOS.items():
        if a.only and name not in a.only:
            continue
        t = time.time()
        try:
            with torch.inference_mode():  # as ComfyUI's executor runs every node
                results[name] = fn(ctx)
        except Exception as e:  # noqa: BLE001 - recorded for the test that owns the scenario
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        results[name]["seconds"] = round(time.time() - t, 2)
    a.out.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
