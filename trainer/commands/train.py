"""``train``: the rotation generators of the chosen heads (design §3.4)."""

from __future__ import annotations

from .stage import register_stage

SUMMARY = 'learn the rotation generators of the chosen heads'
DESCRIPTION = (
    'Learn A = W - W^T per chosen head with unlearn (anchor | deviate) and preserve (distill | flow)\n'
    'objectives; only the generators get gradients. Checkpoints every N steps (rotated, atomic);\n'
    '--resume latest continues exactly. Writes OUT/adapter.safetensors and OUT/metrics.json.'
)
EXAMPLE = (
    'python -m trainer train --out runs/nudity --steps 300 --unlearn anchor --anchors rewrites.txt \\\n'
    '    --preserve distill --threshold 0.5'
)


def register(sub) -> None:
    register_stage(sub, 'train', summary=SUMMARY, description=DESCRIPTION, example=EXAMPLE)
