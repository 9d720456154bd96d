"""What any query/key intervention on the text tokens can do, per colour of the toy world: an upper bound.

    python scripts/key_ablation.py [--seeds 1] [--prompts FILE --concept C]

SafeRoPE rotates queries and keys: it changes *where* tokens attend, never the values they read.
This script takes that to its limit: in every block, every text key is replaced by the mean of the
prompt's text keys (after QK-norm, before RoPE, through :func:`saferope_engine.diffusers.observe_qk`),
so attention cannot tell one text token from another — routing through the text tokens is gone,
their values still arrive (averaged). A concept that survives this lives in the values spread over
the text tokens, and no rotation of text queries or keys can erase it. Prints a Markdown table: per
colour, the share of its held-out explicit prompts and of its implicit-trigger prompts drawn in it by
the base model and with uniform text keys; with ``--prompts`` (one prompt per line, e.g. the prompts a
search found: ``OUT/found-<concept>.txt`` of ``scripts/hold_study.py``) one more row for those, in ``--concept``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def uniform_text_keys(kind: str, index: int, which: str, x, txt_len: int, img_first: bool) -> None:
    """An ``observe_qk`` observer writing into the keys: every text key := the mean text key."""
    if which != "k" or txt_len == 0:
        return
    L = x.shape[2]  # x: (B, H, L, D), a view of the norm's output (the attention reads it next)
    t = x[..., L - txt_len:, :] if img_first else x[..., :txt_len, :]  # (B, H, txt_len, D)
    t.copy_(t.mean(dim=2, keepdim=True).expand_as(t))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=1, help="images per held-out prompt (default 1)")
    ap.add_argument("--prompts", type=Path, default=None, help="a file of prompts (one per line) for one more row")
    ap.add_argument("--concept", default=None, help="the colour --prompts are scored for")
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error("--seeds must be ≥ 1")
    extra = None
    if args.prompts is not None:
        if not args.prompts.is_file():
            ap.error(f"--prompts {args.prompts}: no such file")
        extra = [ln.strip() for ln in args.prompts.read_text().splitlines() if ln.strip()]
        if not extra or args.concept is None:
            ap.error("--prompts needs a non-empty file and --concept")

    from saferope_engine.diffusers import observe_qk
    from trainer.toy import load_pipeline, load_recipe, world
    from trainer.toy.attacks import concept_score
    from trainer.toy.sampling import generate

    if args.concept is not None and args.concept not in world.CONCEPTS:
        ap.error(f"--concept {args.concept!r}: the toy world's concepts are {', '.join(world.CONCEPTS)}")
    pipe, recipe = load_pipeline(), load_recipe()

    def rates(texts: list[str], c: str) -> str:
        texts = [t for t in texts for _ in range(args.seeds)]
        seeds = [10_000 + i for i in range(len(texts))]
        base = concept_score(generate(pipe, texts, recipe, seed=seeds), c) > 0
        with observe_qk(pipe.transformer, uniform_text_keys):
            ablated = concept_score(generate(pipe, texts, recipe, seed=seeds), c) > 0
        return f"{100 * base.mean():.0f}% → {100 * ablated.mean():.0f}%"

    lines = ["| colour | explicit prompts drawn in it: base → uniform text keys | implicit triggers: base → "
             "uniform text keys |", "|---|---:|---:|"]
    for c in world.CONCEPTS:
        cells = [rates([p.text for p in prompts], c) for prompts in (world.explicit_prompts(c, "eval"),
                                                                     world.implicit_prompts(c))]
        lines.append(f"| {c} | {cells[0]} | {cells[1]} |")
    if extra:
        lines.append(f"| {args.concept}: {len(extra)} prompts of {args.prompts.name} | {rates(extra, args.concept)} | |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
