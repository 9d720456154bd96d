"""The colours the toy model draws for prompts with out-of-vocabulary pieces: the space the prompt search mines.

    python scripts/oov_colours.py --concept red [--adapter demo_out/adapter.safetensors] [--n 200] [--seed 0]

Every prompt the black-box search finds holds a CLIP subword piece outside the toy world's vocabulary,
which the toy's T5 tokenizer spells letter by letter — tokens the toy T5 never saw in training. This
script measures what such pieces do without any search: ``--n`` random prompts, each a benign
held-out prompt of the concept's benign set with ``--pieces`` random pieces of the attack's
vocabulary (:func:`trainer.toy.attacks.attack_vocabulary`, the concept's words banned) that are not
world words inserted at random places, one image each (seeded). Prints a Markdown table: the share of
images in each colour of the palette (and with nothing drawn), on the base model and, with
``--adapter``, with it applied; then how many prompts the base model drew in the concept, how many of
those stay so with the adapter, and how many the adapter turned towards it.
Deterministic for a given ``--seed``.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def random_prompts(concept: str, pieces: list[str], n: int, per_prompt: int, seed: int) -> list[str]:
    """``n`` benign held-out prompts of ``concept``'s set, each with ``per_prompt`` of ``pieces`` inserted."""
    import numpy as np

    from trainer.toy import world

    rng = np.random.default_rng(seed)
    benign = [p.text for p in world.benign_prompts(concept, "eval")]
    out = []
    for _ in range(n):
        words = benign[int(rng.integers(len(benign)))].split()
        for _ in range(per_prompt):
            words.insert(int(rng.integers(len(words) + 1)), pieces[int(rng.integers(len(pieces)))])
        out.append(" ".join(words))
    return out


def colour_shares(colours: list[str], names: list[str]) -> list[float]:
    counts = Counter(colours)
    return [counts[c] / len(colours) for c in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concept", default="red", help="the concept whose words are banned and whose share is reported")
    ap.add_argument("--adapter", type=Path, default=None, help="an adapter .safetensors for the toy model (optional)")
    ap.add_argument("--n", type=int, default=200, help="random prompts (default 200)")
    ap.add_argument("--pieces", type=int, default=1, help="out-of-vocabulary pieces per prompt (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompts and images (default 0)")
    args = ap.parse_args()
    if args.n < 1 or args.pieces < 1:
        ap.error("--n and --pieces must be ≥ 1")
    if args.adapter is not None and not args.adapter.is_file():
        ap.error(f"--adapter {args.adapter}: no such file")

    from saferope_engine import load_adapter
    from saferope_engine.diffusers import apply_saferope
    from trainer.toy import classifier, load_pipeline, load_recipe, world
    from trainer.toy.attacks import attack_vocabulary
    from trainer.toy.sampling import generate

    if args.concept not in world.CONCEPTS:
        ap.error(f"--concept {args.concept!r}: the toy world's concepts are {', '.join(world.CONCEPTS)}")
    pipe, recipe = load_pipeline(), load_recipe()
    vocab = set(world.vocabulary())
    pieces = [p for p in attack_vocabulary(pipe, args.concept) if p not in vocab]
    prompts = random_prompts(args.concept, pieces, args.n, args.pieces, args.seed)
    seeds = [args.seed * 100_000 + i for i in range(len(prompts))]

    def colours() -> list[str]:
        return [c for _, c in classifier.classify_batch(generate(pipe, prompts, recipe, seed=seeds))]

    runs = {"base model": colours()}
    if args.adapter is not None:
        with apply_saferope(pipe.transformer, load_adapter(args.adapter)):
            runs[f"with {args.adapter.name}"] = colours()
    names = list(world.PALETTE) + sorted({c for cs in runs.values() for c in cs} - set(world.PALETTE))
    lines = [f"{len(prompts)} benign held-out prompts of '{args.concept}' with {args.pieces} random out-of-vocabulary "
             f"piece(s) each (of {len(pieces)}; seed {args.seed}), one image each:", "",
             "| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, cs in runs.items():
        lines.append(f"| {label} | " + " | ".join(f"{100 * s:.0f}%" for s in colour_shares(cs, names)) + " |")
    if args.adapter is not None:
        base, ours = runs.values()
        turned = sum(b != args.concept and o == args.concept for b, o in zip(base, ours))
        kept = sum(b == args.concept and o == args.concept for b, o in zip(base, ours))
        n_base = sum(b == args.concept for b in base)
        lines += ["", f"Drawn in {args.concept} by the base model: {n_base}; of those still {args.concept} with the "
                      f"adapter: {kept}; turned {args.concept} by the adapter: {turned}."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
