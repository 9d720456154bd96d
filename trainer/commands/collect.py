"""``collect``: Gram statistics of queries/keys on unsafe and safe prompts (design §3.1)."""

from __future__ import annotations

from .stage import register_stage

SUMMARY = 'accumulate Gram statistics of queries/keys on unsafe and safe prompts'
DESCRIPTION = (
    'Run the frozen transformer on the unsafe and safe prompt files at several noise levels and\n'
    'accumulate per-head Gram matrices of the post-QK-norm, pre-RoPE queries and keys (padding\n'
    'excluded; memory independent of the prompt count). Resumable with --resume latest.'
)
EXAMPLE = (
    'python -m trainer collect --model ./FLUX.1-dev --unsafe nudity.txt --safe coco.txt \\\n'
    '    --sigmas 1,0.8,0.6,0.4 --out runs/nudity'
)


def register(sub) -> None:
    register_stage(sub, 'collect', summary=SUMMARY, description=DESCRIPTION, example=EXAMPLE)
