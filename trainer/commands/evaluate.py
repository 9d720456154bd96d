"""``evaluate``: generate prompt sets with and without adapters at fixed seeds; metrics (:mod:`trainer.evaluation`)."""

from __future__ import annotations

import argparse

from ..core.config import RunConfig
from ..core.rundir import RunDir
from .base import add_command, add_config_flags, overrides_from_args


def register(sub) -> None:
    p = add_command(sub, "evaluate", summary="generate prompt sets with/without adapters at fixed seeds; metrics",
                    description="Generate every prompt of every set with the base model and with each adapter at the\n"
                                "same seeds, and report per set and variant: gated share, changed-vs-base share, PSNR\n"
                                "to the base image, and scorer metrics (the toy world's classifier for the toy model;\n"
                                "NudeNet when the optional `nudenet` package is installed), SSIM to the base image, and\n"
                                "CLIP score with --clip DIR. --recipe NAME evaluates a recipe's held-out prompts (explicit,\n"
                                "indirect, paraphrase) and its benign set with its scorers. Writes metrics.json, results.csv\n"
                                "and results.json (one row per prompt, seed and variant) and report.md under OUT/evaluate/.\n"
                                "Prompt files may carry expected labels: 'a red circle<TAB>colour=red,shape=circle'.",
                    example="python -m trainer evaluate --out runs/nudity --recipe nudity --limit 25 --seeds 0,1\n"
                            "python -m trainer evaluate --model toy --adapter runs/red/adapter.safetensors \\\n"
                            "    --prompts explicit=red_eval.txt --prompts benign=benign_eval.txt --seeds 0,1,2 \\\n"
                            "    --steps 20 --out runs/red")
    add_config_flags(p, "evaluate")
    p.add_argument("--stack", action="store_true", help="also evaluate all adapters applied together")
    p.add_argument("--attack-budget", type=int, default=0, metavar="N",
                   help="toy-world models: also attack each adapter (black-box prompt search of N images and white-box "
                        "embedding PGD, trainer.toy.attacks); writes OUT/evaluate/attacks.json and attacks.md")
    p.set_defaults(func=run)


def load_eval_config(args: argparse.Namespace) -> RunConfig:
    """The evaluation's config: a run directory's stored config is the base when ``--out`` holds a run."""
    from ..resolve import resolve

    overrides = overrides_from_args(args, "evaluate")
    cfg = resolve(config_file=args.config, overrides=overrides)
    if cfg.out and RunDir(cfg.out).has_run():
        cfg = resolve(run_config=RunDir(cfg.out).config, config_file=args.config, overrides=overrides)
    return cfg


def run(args: argparse.Namespace) -> int:
    from ..core.errors import UsageError
    from ..evaluation.evaluate import run_evaluation

    if args.attack_budget < 0:
        raise UsageError(f"--attack-budget must be ≥ 0, got {args.attack_budget}")
    cfg = load_eval_config(args)
    bench = _attack_benchmark(cfg) if args.attack_budget else None  # checked before any work
    code = run_evaluation(cfg, stack=args.stack)
    if code == 0 and bench is not None:
        bench.run(cfg, args.attack_budget)
    return code


def _attack_benchmark(cfg: RunConfig):
    from ..evaluation.attacks import attack_for
    from ..families.models import resolve_model

    return attack_for(resolve_model(cfg.model).path)
