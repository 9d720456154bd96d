"""Fixtures of the ComfyUI-backed tests: a ComfyUI tree from ``COMFYUI_PATH``, the driver's results.

Run them with a Python that has ComfyUI's requirements, e.g.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/comfy

(or any pytest plus ``COMFYUI_PYTHON=/path/to/comfy-venv/bin/python``). Without ``COMFYUI_PATH``
every test here is skipped. ComfyUI itself always runs in a child process (comfy_driver.py, or
main.py for the HTTP test) whose ``sys.path`` never holds this repository.

With ``SAFEROPE_COMFY_NO_SKIP=1`` (what ``.ci/run`` sets) a skipped test fails the run: CI must
have exercised every one of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from comfy_env import HERE, SKIP_REASON, comfy_python


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("SAFEROPE_COMFY_NO_SKIP") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped or session.testscollected == 0:
        reasons = sorted({str(r.longrepr[-1]) if isinstance(r.longrepr, tuple) else str(r.longrepr) for r in skipped})
        sys.stderr.write(f"SAFEROPE_COMFY_NO_SKIP=1: {len(skipped)} skipped, {session.testscollected} collected "
                         f"(every ComfyUI-backed test must run): {reasons}\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    path = os.environ.get("COMFYUI_PATH")
    if not path or not (Path(path) / "comfy" / "model_patcher.py").is_file():
        pytest.skip(SKIP_REASON)
    return Path(path).resolve()


@pytest.fixture(scope="session")
def driver(comfyui_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Runs every scenario of driver_scenarios.py once in a ComfyUI process; returns the results."""
    work = tmp_path_factory.mktemp("comfy_driver")
    out = work / "results.json"
    cmd = [comfy_python(), str(HERE / "comfy_driver.py"), "--comfyui", str(comfyui_path), "--work", str(work),
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=str(work), capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0 or not out.is_file():
        pytest.fail(f"the ComfyUI driver failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    results = json.loads(out.read_text())
    results["work"] = str(work)
    return results


@pytest.fixture
def scenario(driver: dict):
    """``scenario(name)``: one scenario's observations; fails the test with the driver's traceback if it raised."""
    def get(name: str) -> dict:
        r = driver[name]
        if "error" in r:
            pytest.fail(f"scenario {name!r} raised in ComfyUI {driver['info']['version']}: {r['error']}\n"
                        f"{r.get('traceback', '')}")
        return r
    return get
