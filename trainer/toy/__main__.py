"""``python -m trainer.toy train|eval``: retrain or evaluate the toy FLUX pipeline."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.toy", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the toy pipeline from scratch, then evaluate it")
    t.add_argument("--out", type=Path, default=None, help="output folder (default: the shipped TOY_MODEL_DIR)")
    t.add_argument("--steps", type=int, default=None, help="transformer training steps")
    t.add_argument("--vae-steps", type=int, default=None, help="VAE training steps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    e = sub.add_parser("eval", help="print base accuracy on benign, explicit and implicit prompts")
    e.add_argument("--model", type=Path, default=None, help="pipeline folder (default: TOY_MODEL_DIR)")
    e.add_argument("--concept", default="red")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--repeats", type=int, default=1, help="images per prompt")
    for sp in (t, e):
        sp.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def _evaluate(folder: Path, concept: str, seed: int, repeats: int = 1) -> None:
    from . import load_pipeline, load_recipe
    from .evaluate import evaluate_base, format_report

    pipe = load_pipeline(folder)
    report = evaluate_base(pipe, load_recipe(folder), concept=concept, seed=seed, repeats=repeats)
    print(format_report(report, concept))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from .config import TOY_MODEL_DIR

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "train":
        from .config import ToyConfig
        from .train import train

        cfg = ToyConfig()
        if args.steps is not None:
            cfg = cfg.replace(steps=args.steps)
        if args.vae_steps is not None:
            cfg = cfg.replace(vae_steps=args.vae_steps)
        out = args.out or TOY_MODEL_DIR
        t0 = time.perf_counter()
        train(out, cfg, seed=args.seed)
        print(f"trained {out} in {time.perf_counter() - t0:.0f} s")
        if not args.no_eval:
            _evaluate(out, "red", args.seed)
        return 0
    _evaluate(args.model or TOY_MODEL_DIR, args.concept, args.seed, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
