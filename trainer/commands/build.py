"""``build``: collect → select → train from one config file or a recipe (the usual way)."""

from __future__ import annotations

from .stage import register_stage

SUMMARY = 'collect → select → train from one config file or a recipe (the usual way)'
DESCRIPTION = (
    'Run collect, select and train in one go from a TOML config file and/or a concept recipe\n'
    '(--recipe NAME|DIR: prompts, concept and per-model-family defaults; see `recipes`); flags override both.\n'
    'Writes OUT/config.resolved.toml, OUT/adapter.safetensors, OUT/metrics.json, OUT/select/scores.png\n'
    'and logs. Interrupted? Run the same command with --resume latest.'
)
EXAMPLE = (
    'python -m trainer build --recipe nudity --model ./FLUX.1-dev --out runs/nudity\n'
    'python -m trainer build --config red.toml --out runs/red\n'
    '\n'
    'red.toml:\n'
    '  model = "toy"\n'
    '  concepts = ["red"]\n'
    '  [prompts]\n'
    '  unsafe = "red.txt"      # \'a red circle<TAB>a blue circle\' lines for the anchor objective\n'
    '  safe = "benign.txt"\n'
    '  [select]\n'
    '  rank = 2\n'
    '  count = 8\n'
    '  [train]\n'
    '  steps = 300\n'
    '  unlearn = "anchor"\n'
    '  preserve = "distill"\n'
    '  threshold = 0.5'
)


def register(sub) -> None:
    register_stage(sub, 'build', summary=SUMMARY, description=DESCRIPTION, example=EXAMPLE)
