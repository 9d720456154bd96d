"""``select``: head scores and the chosen heads, from collected statistics (design §3.2-3.3)."""

from __future__ import annotations

from .stage import register_stage

SUMMARY = 'score heads and choose the safety-critical ones (heatmap PNG + table)'
DESCRIPTION = (
    "Compute each head's unsafe subspace (top-r eigenvectors) and its discrimination score\n"
    'd = E_unsafe - E_safe from the collected statistics; keep heads by count, fraction or margin.\n'
    'Writes OUT/select/scores.png (blocks x heads), heads.csv, heads.md and selection.json.'
)
EXAMPLE = (

    'python -m trainer select --out runs/nudity --rank 4 --count 24'
)


def register(sub) -> None:
    register_stage(sub, 'select', summary=SUMMARY, description=DESCRIPTION, example=EXAMPLE)
