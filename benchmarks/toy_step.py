"""Sampling time per denoising step of the shipped toy FLUX with and without SafeRoPE adapters. Prints JSON.

    python -m trainer demo --out demo_out
    python benchmarks/toy_step.py demo_out/adapter.safetensors --rounds 15

Runs the pipeline on one batch of the concept's held-out explicit prompts (every text token on
the gated path), base and each adapter in turn, the order rotating every round; reports the
median seconds per step and the median of the within-round ratios to the base model. The demo
measures the same with fewer rounds; on a small shared machine single rounds vary by ±10%.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("adapters", nargs="+", type=Path, help="adapter .safetensors files (each timed alone)")
    ap.add_argument("--concept", default="red", help="toy concept whose explicit prompts are sampled (default red)")
    ap.add_argument("--batch", type=int, default=64, help="prompts per batch (default 64)")
    ap.add_argument("--rounds", type=int, default=15, help="timing rounds (default 15)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()

    import torch

    from saferope_engine import load_adapter
    from trainer.toy import load_pipeline, load_recipe
    from trainer.toy.benchmark import Variant, eval_sets, time_per_step

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe, recipe = load_pipeline(), load_recipe()
    prompts = [p.text for p in itertools.islice(itertools.cycle(eval_sets(args.concept)["explicit"]), args.batch)]
    variants = [Variant("base", "base model")] + [
        Variant(path.name if i == 0 else f"{i}:{path.name}", str(path), (load_adapter(path),))
        for i, path in enumerate(args.adapters)]
    seconds, ratios = time_per_step(pipe, recipe, variants, prompts, args.rounds)
    print(json.dumps({"batch": args.batch, "rounds": args.rounds, "threads": torch.get_num_threads(),
                      "steps": recipe.num_inference_steps, "seconds_per_step": {k: round(v, 5) for k, v in seconds.items()},
                      "relative_to_base": {k: round(v, 4) for k, v in ratios.items()}}, indent=2))


if __name__ == "__main__":
    main()
