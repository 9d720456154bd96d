"""Repository-level promises: CI runs the README's test command; the engine imports torch only."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", quick, re.S)
            for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def ci_lines() -> list[str]:
    return [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_ci_runs_the_readme_test_command_first():
    cmds = readme_commands()
    tests = [c for c in cmds if "pytest" in c]
    assert len(tests) == 1, cmds
    runs = [line for line in ci_lines() if "pytest" in line]
    assert runs[0] == tests[0]  # verbatim, before the ComfyUI-backed tests


def test_ci_runs_the_readme_comfyui_test_command_for_every_tree():
    text = (ROOT / "README.md").read_text()
    section = text.split("### Tests", 1)[1].split("\n### ", 1)[0]
    cmds = [line.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)
            for line in block.splitlines() if "tests/comfy" in line and not line.strip().startswith("#")]
    assert len(cmds) == 1, cmds
    runs = [line for line in ci_lines() if "tests/comfy" in line]
    assert len(runs) == 1 and runs[0].startswith(cmds[0]), (runs, cmds)  # CI adds only --junitxml
    assert "SAFEROPE_COMFY_NO_SKIP=1" in cmds[0] and "pip install -q gguf" in cmds[0]


def test_readme_main_command_is_the_toy_demo():
    main = [c for c in readme_commands() if "pytest" not in c]
    assert len(main) == 1 and main[0].endswith("-m trainer demo --out demo_out"), main


def test_requirements_never_pin_torch():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_reqs = [d for d in deps if re.match(r"torch\b", d)]
    assert all("==" not in d and "<" not in d for d in torch_reqs), torch_reqs
    req = ROOT / "requirements.txt"
    if req.exists():
        assert not re.search(r"^\s*torch", req.read_text(), re.M)


def test_engine_core_imports_only_torch():
    # torch._dynamo too: importing it costs seconds (ComfyUI's start, every trainer command); the engine
    # only needs it while torch.compile traces it, when it is loaded anyway
    code = ("import sys, saferope_engine, saferope_engine.subspace, saferope_engine.authors, "
            "saferope_engine.diffusers, saferope_engine.testing\n"
            "bad = [m for m in ('diffusers', 'transformers', 'comfy', 'safetensors', 'nodes', 'trainer', 'torch._dynamo') "
            "if m in sys.modules]\nprint(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
