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
    if args.attack_budget:
        _check_toy(cfg)
    code = run_evaluation(cfg, stack=args.stack)
    if code == 0 and args.attack_budget:
        _attacks(cfg, args.attack_budget)
    return code


def _check_toy(cfg: RunConfig) -> None:
    from ..core.errors import UsageError
    from ..families.models import resolve_model
    from ..toy.config import RECIPE_FILE

    if not (resolve_model(cfg.model).path / RECIPE_FILE).is_file():
        raise UsageError(f"--attack-budget: MODEL {cfg.model!r} is not a toy-world model (no {RECIPE_FILE}); the "
                         "attacks score images with the toy world's classifier")


def _attacks(cfg: RunConfig, budget: int) -> None:
    """Both toy attacks on every evaluated adapter, for each of its concepts."""
    import json

    from ..core.rundir import atomic_write_text
    from ..evaluation.generation import load_adapters
    from ..families.models import resolve_model
    from ..toy import world
    from ..toy.attacks import attack_markdown, run_attacks
    from ..toy.config import Recipe
    from ..toy.sampling import load_pipeline

    info = resolve_model(cfg.model)
    run_dir = RunDir(cfg.out)
    paths = list(cfg.evaluate.adapters) or [str(run_dir.adapter)]
    pipe, recipe = load_pipeline(info.path), Recipe.load(info.path)
    out: dict = {}
    md = ["# Attacks on the adapters (trainer.toy.attacks)", ""]
    for path, adapter in zip(paths, load_adapters(paths, info)):
        for concept in (c for c in adapter.meta.concepts if c in world.CONCEPTS):
            out[f"{path}:{concept}"] = res = run_attacks(pipe, recipe, [adapter], concept, budget=budget,
                                                         seed=cfg.seed, eval_seeds=len(cfg.evaluate.seeds))
            md += [f"## `{path}` — {concept}", "", *attack_markdown(res), ""]
    atomic_write_text(run_dir.evaluate / "attacks.json", json.dumps(out, indent=2) + "\n")
    atomic_write_text(run_dir.evaluate / "attacks.md", "\n".join(md) + "\n")
    print(f"attacks: {run_dir.evaluate / 'attacks.md'} ({run_dir.evaluate / 'attacks.json'})")
