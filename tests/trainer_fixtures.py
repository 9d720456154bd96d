"""Prompt files and configs for the trainer tests (a concept world of two made-up words).

``zorblax`` and ``quibble`` play the unsafe concept: the tiny pipeline gives them their own
query/key directions, so an adapter built from these prompts gates them and nothing else at
``THRESHOLD``.
"""

from __future__ import annotations

import os
from pathlib import Path

UNSAFE = [
    ("zorblax quibble zorblax quibble", "tree house tree house"),
    ("red zorblax quibble zorblax quibble", "red tree house tree house"),
    ("zorblax quibble field zorblax quibble", "tree house field tree house"),
    ("zorblax quibble zorblax quibble painting", "tree house tree house painting"),
    ("small zorblax quibble zorblax quibble", "small tree house tree house"),
    ("zorblax quibble dog zorblax quibble", "tree house dog tree house"),
]
SAFE = ["a tree on a plain background", "a blue house in a field", "a photo of a dog", "a small cat and a car",
        "a boat on the ocean", "a green forest painting"]
EVAL_UNSAFE = ["a zorblax", "a red house with a zorblax", "quibble in the sky"]
EVAL_SAFE = ["a cat", "a yellow car on a plain background", "a dark ocean"]
THRESHOLD = 0.9


def write_prompts(folder: Path) -> dict[str, Path]:
    """unsafe.txt (with tab-separated anchors), safe.txt, eval_unsafe.txt, eval_safe.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "unsafe": "# unsafe prompt<TAB>safe rewrite\n" + "\n".join(f"{u}\t{a}" for u, a in UNSAFE) + "\n",
        "safe": "\n".join(SAFE) + "\n",
        "eval_unsafe": "\n".join(EVAL_UNSAFE) + "\n",
        "eval_safe": "\n".join(EVAL_SAFE) + "\n",
    }
    out = {}
    for name, text in files.items():
        p = folder / f"{name}.txt"
        p.write_text(text, encoding="utf-8")
        out[name] = p
    return out


def write_config(folder: Path, model: Path, *, steps: int = 8, checkpoint_every: int = 4, keep_checkpoints: int = 3,
                 extra: str = "") -> Path:
    """A small build config (relative prompt paths, resolved against the config's folder)."""
    write_prompts(folder)
    text = f"""
model = "{model}"
concepts = ["zorblax"]
device = "cpu"

[prompts]
unsafe = "unsafe.txt"
safe = "safe.txt"

[collect]
sigmas = [1.0, 0.6]
batch_size = 3

[select]
rank = 2
count = 4
kinds = ["double"]

[train]
steps = {steps}
batch_size = 2
lr = 0.05
checkpoint_every = {checkpoint_every}
keep_checkpoints = {keep_checkpoints}
threshold = {THRESHOLD}
rollout_steps = 4
unlearn_sigmas = [0.5, 1.0]
preserve_sigmas = [0.25, 1.0]
{extra}
"""
    path = folder / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def subprocess_env() -> dict[str, str]:
    """Environment for ``python -m trainer`` subprocesses (repo on the path, offline, 1 thread)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env
