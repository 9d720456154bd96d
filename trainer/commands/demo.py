"""``python -m trainer demo``: erase a colour from the shipped toy FLUX and measure it (design §6).

Steps (progress is logged; everything lands in ``--out``):

1. prompt files from the toy world: the concept's explicit prompts with their anchor rewrites
   (training templates only — never an implicit trigger) and benign prompts;
2. ``build`` with our settings (anchor + distill): collect → select → train → ``runs/saferope``;
3. the authors' objective (``deviate``) trained on the same statistics and heads → ``runs/deviate``;
4. a control: the same heads with random generators of the same norms → ``runs/random``;
5. a prompt-blocklist baseline (the concept word deleted from prompts);
6. the benchmark on held-out prompts (:mod:`trainer.toy.benchmark`), then ``adapter.safetensors``,
   ``report.json``, ``report.md`` and ``grid.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..core import comfyui_copy
from ..core.errors import UsageError
from .base import add_command

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """What the demo builds and measures. ``quick()`` is the reduced setting the tests run."""

    out: str
    concept: str = "red"
    model: str = "toy"
    rank: int = 8
    count: int = 16  # heads kept
    basis: str = "contrast"  # see trainer.stages.select
    contrast_weight: float = 1.0
    segment: str = "txt"  # token segment whose statistics give the bases and head scores
    collect_segments: tuple[str, ...] = ("txt",)
    threshold: float | None = None  # None: calibrated by build on held-out prompts (trainer.stages.calibrate)
    steps: int = 150  # training steps of each trained variant
    lr: float = 5e-2
    lambda_preserve: float = 2.0  # weight of the benign-preservation (distill) loss
    double_segments: tuple[str, ...] = ("txt",)
    single_segments: tuple[str, ...] = ("txt",)
    collect_sigmas: tuple[float, ...] = (1.0, 0.8, 0.6, 0.4)
    seeds_per_prompt: int = 2  # images per held-out prompt
    timing_rounds: int = 8
    variants: tuple[str, ...] = ("deviate", "random", "blocklist")  # besides base and ours
    seed: int = 0
    # Unsafe build prompts; None: the concept's explicit build prompts. Others (e.g. prompts an attack found,
    # scripts/hold_study.py) train towards trainer.toy.attacks.found_anchor; never an implicit trigger.
    unsafe_prompts: tuple[str, ...] | None = None
    calibrate_safe_share: float = 0.3  # calibrate.safe_share of the build (when τ is calibrated)
    calibrate_margin: float = 0.02  # calibrate.margin
    attack_budget: int = 400  # images of the black-box prompt search (trainer.toy.attacks); 0 = no attacks
    pgd_eps: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2)  # white-box PGD radii (relative to the embeddings' rms)
    pgd_steps: int = 10

    @classmethod
    def quick(cls, out: str, **kw: Any) -> DemoSettings:
        return cls(out=out, **{"steps": 60, "seeds_per_prompt": 1, "timing_rounds": 1,
                               "variants": ("random", "blocklist"), "collect_sigmas": (1.0, 0.6),
                               "attack_budget": 32, "pgd_eps": (0.05, 0.2), "pgd_steps": 2, **kw})


def register(sub) -> None:
    p = add_command(
        sub, "demo", summary="erase 'red' from the shipped toy FLUX and benchmark it (the main demo)",
        description=("Build a SafeRoPE adapter that erases a colour from the shipped toy FLUX model (collect →\n"
                     "select → train on explicit prompts only), compare it on held-out explicit prompts, unseen\n"
                     "implicit triggers ('tomato', 'crimson', …) and benign prompts against the base model, the\n"
                     "authors' objective, random generators and a prompt blocklist. Writes OUT/adapter.safetensors,\n"
                     "OUT/report.json, OUT/report.md and OUT/grid.png. A few minutes on 2 CPU cores."),
        example="python -m trainer demo --out demo_out")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--concept", default="red", help="colour to erase (default: red)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps per trained variant (default {DemoSettings.steps})")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"images per held-out prompt (default {DemoSettings.seeds_per_prompt})")
    p.add_argument("--threshold", type=float, default=None,
                   help="risk threshold τ (default: calibrated by build on held-out build prompts)")
    p.add_argument("--attack-budget", type=int, default=None,
                   help=f"images of the black-box prompt-search attack (default {DemoSettings.attack_budget}; 0: no attacks)")
    p.add_argument("--quick", action="store_true", help="reduced setting (what the tests run): fewer steps and images")
    p.add_argument("--comfyui", metavar="PATH", default=None,
                   help="also copy the adapter to PATH/models/saferope/saferope-toy-<concept>.safetensors, where the "
                        "toy example workflow finds it (PATH: a ComfyUI folder; an existing file is never overwritten)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    kw = {k: v for k, v in (("concept", args.concept), ("steps", args.steps), ("seeds_per_prompt", args.seeds),
                            ("threshold", args.threshold), ("attack_budget", args.attack_budget)) if v is not None}
    settings = DemoSettings.quick(args.out, **kw) if args.quick else DemoSettings(out=args.out, **kw)
    from ..core.rundir import check_output_dir

    check_output_dir(Path(settings.out))  # an unusable --out is bad input (exit 2), before any work
    target = comfyui_copy.destination(args.comfyui, comfyui_copy.toy_adapter_name(settings.concept)) \
        if args.comfyui else None  # checked before any work
    report = run_demo(settings)
    print(report["table_md"])
    print()
    missed = missed_targets(report["targets"])
    print(f"{'targets:':13}" + ("met" if not missed else "NOT met: " + "; ".join(missed)))
    for name in ("adapter", "report_json", "report_md", "grid"):
        print(f"{name + ':':13}{report['files'][name]}")
    if target is not None:
        print(f"{'comfyui:':13}{comfyui_copy.copy_new(Path(report['files']['adapter']), target)}")
    return 0


# -- the steps -----------------------------------------------------------------------------------------

def _check(settings: DemoSettings) -> tuple[Path, Any, Any]:
    from trainer.toy import world
    from trainer.toy.config import RECIPE_FILE, Recipe

    from ..families.models import resolve_model

    if settings.concept not in world.CONCEPTS:
        raise UsageError(f"--concept {settings.concept!r}: the toy world's concepts are {', '.join(world.CONCEPTS)}")
    if settings.steps < 1 or settings.seeds_per_prompt < 1:
        raise UsageError("--steps and --seeds must be ≥ 1")
    if settings.attack_budget < 0:
        raise UsageError(f"--attack-budget must be ≥ 0, got {settings.attack_budget}")
    if settings.threshold is not None and not 0.0 <= settings.threshold < 1.0:
        raise UsageError(f"--threshold must be in [0, 1), got {settings.threshold}")
    out = Path(settings.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {str(out)!r} exists and is not empty; choose a new folder")
    info = resolve_model(settings.model)
    if not (info.path / RECIPE_FILE).is_file():
        raise UsageError(f"MODEL {settings.model!r} is not a toy-world model (no {RECIPE_FILE})")
    return out, info, Recipe.load(info.path)


def _write_prompts(folder: Path, concept: str, prompts: tuple[str, ...] | None = None) -> dict[str, Path]:
    from trainer.toy import world
    from trainer.toy.attacks import found_anchor

    folder.mkdir(parents=True, exist_ok=True)
    unsafe = [p.text for p in world.explicit_prompts(concept, "build")] if prompts is None else list(prompts)
    triggers = world.trigger_words(concept)
    if any(t in p for p in unsafe for t in triggers):  # never build from implicit triggers
        raise UsageError(f"the unsafe build prompts name an implicit trigger of {concept!r} (held out for evaluation)")
    files = {"unsafe": folder / "unsafe.txt", "safe": folder / "safe.txt"}
    files["unsafe"].write_text("".join(f"{p}\t{found_anchor(p, concept)}\n" for p in unsafe))
    files["safe"].write_text("".join(p.text + "\n" for p in world.benign_prompts(concept, "build")))
    return files


def _config(settings: DemoSettings, recipe, prompts: dict[str, Path], out: Path, **train: Any):
    from ..resolve import resolve

    overrides = {
        "model": settings.model, "out": str(out), "concepts": [settings.concept], "seed": settings.seed,
        "base_model": "SafeRoPE toy FLUX (trainer/toy)", "device": "cpu", "height": recipe.height,
        "width": recipe.width, "guidance": recipe.guidance_scale, "max_sequence_length": recipe.max_sequence_length,
        "prompts.unsafe": str(prompts["unsafe"]), "prompts.safe": str(prompts["safe"]),
        "collect.sigmas": list(settings.collect_sigmas),
        "select.rank": settings.rank, "select.count": settings.count, "select.basis": settings.basis,
        "select.contrast_weight": settings.contrast_weight,
        "select.segment": settings.segment, "collect.segments": list(settings.collect_segments),
        "train.steps": settings.steps, "train.lr": settings.lr,
        "train.threshold": float("nan") if settings.threshold is None else settings.threshold,
        "train.lambda_preserve": settings.lambda_preserve,
        "train.double_segments": list(settings.double_segments),
        "train.single_segments": list(settings.single_segments),
        "train.checkpoint_every": max(settings.steps, 1), "train.keep_checkpoints": 1,
        "calibrate.safe_share": settings.calibrate_safe_share, "calibrate.margin": settings.calibrate_margin,
    }
    overrides.update({f"train.{k}": v for k, v in train.items()})
    return resolve(overrides=overrides)


def _run_stage(command: str, cfg) -> None:
    from ..core.rundir import RunDir
    from ..stages.run import execute, preflight

    execute(preflight(command, cfg, RunDir(cfg.out), None), report=False)


def _random_control(adapter, seed: int):
    """The same heads and bases with random skew generators of the same per-head norms."""
    import torch

    from saferope_engine import BlockAdapter, SafeRoPEAdapter

    g = torch.Generator().manual_seed(seed)
    blocks = []
    for b in adapter.blocks.values():
        gens = {}
        for seg in ("txt", "img"):
            A = b.generator(seg)
            if A is None:
                continue
            W = torch.randn(A.shape, generator=g, dtype=torch.float64)
            R = W - W.transpose(-1, -2)  # (n, r, r) skew
            norm = torch.linalg.matrix_norm(A.double()) / torch.linalg.matrix_norm(R).clamp_min(1e-12)
            gens[seg] = (R * norm[:, None, None]).float()
        blocks.append(BlockAdapter(b.kind, b.index, b.heads, b.U_q, b.U_k, gens.get("txt"), gens.get("img")))
    config = {**(adapter.meta.config or {}), "control": "random generators, same heads and per-head norms"}
    return SafeRoPEAdapter(replace(adapter.meta, config=config), blocks)


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Build, benchmark and report; returns the report dict (also written to OUT/report.json)."""
    import torch

    from saferope_engine import load_adapter
    from trainer.toy.benchmark import Targets, Variant, check_targets, results_table, run_benchmark
    from trainer.toy.sampling import load_pipeline

    out, info, recipe = _check(settings)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out.mkdir(parents=True, exist_ok=True)
    prompts = _write_prompts(out / "prompts", settings.concept, settings.unsafe_prompts)

    logger.info("demo 1/4: building the SafeRoPE adapter (anchor + distill, %d steps)", settings.steps)
    t0 = time.perf_counter()
    best_cfg = _config(settings, recipe, prompts, out / "runs" / "saferope", unlearn="anchor", preserve="distill")
    _run_stage("build", best_cfg)
    timings["build_saferope_s"] = time.perf_counter() - t0
    best = load_adapter(out / "runs" / "saferope" / "adapter.safetensors")

    adapters = {"saferope": best}
    if "deviate" in settings.variants:
        logger.info("demo 2/4: the authors' objective (deviate) on the same statistics and heads")
        t0 = time.perf_counter()
        dev_dir = out / "runs" / "deviate"
        for sub in ("stats", "select", "cache"):
            shutil.copytree(out / "runs" / "saferope" / sub, dev_dir / sub)
        _run_stage("train", _config(settings, recipe, prompts, dev_dir, unlearn="deviate", preserve="distill"))
        adapters["deviate"] = load_adapter(dev_dir / "adapter.safetensors")
        timings["train_deviate_s"] = time.perf_counter() - t0
    if "random" in settings.variants:
        rnd = _random_control(best, settings.seed + 1)
        rnd.save(out / "runs" / "random" / "adapter.safetensors")
        adapters["random"] = load_adapter(out / "runs" / "random" / "adapter.safetensors")

    c = settings.concept
    variants = [Variant("base", "base model")]
    if "deviate" in adapters:
        variants.append(Variant("deviate", "SafeRoPE, authors' objective (deviate)", (adapters["deviate"],)))
    variants.append(Variant("saferope", "SafeRoPE, ours (anchor + distill)", (best,)))
    if "random" in adapters:
        variants.append(Variant("random", "control: random generators, same heads & norms", (adapters["random"],)))
    if "blocklist" in settings.variants:
        variants.append(Variant("blocklist", f"prompt blocklist (deletes '{c}')", blocklist=(c,)))

    logger.info("demo 3/4: sampling held-out prompts with %d variants", len(variants))
    t0 = time.perf_counter()
    torch.manual_seed(settings.seed)
    pipe = load_pipeline(info.path)

    def progress(variant: str, name: str, n: int) -> None:
        logger.info("  %-9s %-8s %4d images", variant, name, n)

    results, images = run_benchmark(pipe, recipe, variants, concept=c, seeds_per_prompt=settings.seeds_per_prompt,
                                    timing_rounds=settings.timing_rounds, progress=progress)
    timings["benchmark_s"] = time.perf_counter() - t0

    attacks = None
    if settings.attack_budget > 0:
        from trainer.toy.attacks import run_attacks

        logger.info("demo: attacking the adapter (prompt search, %d images; PGD, ε %s)", settings.attack_budget,
                    ", ".join(map(str, settings.pgd_eps)))
        t0 = time.perf_counter()
        attacks = run_attacks(pipe, recipe, [best], c, budget=settings.attack_budget, seed=settings.seed,
                              epsilons=settings.pgd_eps, pgd_steps=settings.pgd_steps,
                              eval_seeds=settings.seeds_per_prompt)
        timings["attacks_s"] = time.perf_counter() - t0

    logger.info("demo 4/4: writing the report")
    by_key = {r.key: r for r in results}
    checks = check_targets(by_key["base"], by_key["saferope"], Targets())
    warn_if_ineffective(c, checks)
    shutil.copyfile(out / "runs" / "saferope" / "adapter.safetensors", out / "adapter.safetensors")
    grid = _grid(results, images, settings)
    grid.save(out / "grid.png")
    timings["total_s"] = time.perf_counter() - t_start
    table = results_table(results)
    report = {
        "settings": {**asdict(settings), "recipe": asdict(recipe)},
        "model": str(info.path), "concept": c, "threshold": best.meta.threshold,
        "calibration": (best.meta.config or {}).get("metrics", {}).get("calibration"),
        "self_check": (best.meta.config or {}).get("metrics", {}).get("self_check"),
        "adapter": best.summary(), "rows": [r.row() for r in results], "targets": checks,
        "targets_met": all(v["met"] for v in checks.values()), "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "table_md": table, "attacks": attacks,
        "files": {"adapter": str(out / "adapter.safetensors"), "report_json": str(out / "report.json"),
                  "report_md": str(out / "report.md"), "grid": str(out / "grid.png")},
        "command": " ".join(["python -m trainer"] + sys.argv[1:]) if sys.argv and sys.argv[0].endswith(
            ("trainer", "__main__.py")) else "python -m trainer demo --out " + str(out),
    }
    (out / "report.json").write_text(json.dumps(_finite(report), indent=2) + "\n")
    (out / "report.md").write_text(_markdown(report))
    logger.info("demo done in %.0f s", timings["total_s"])
    return report


def _grid(results, images, settings: DemoSettings):
    from trainer.toy.benchmark import eval_sets, expand, grid_image

    sets = eval_sets(settings.concept)
    rows = []
    for name, k in (("explicit", 4), ("implicit", 6), ("benign", 4)):
        items, _ = expand(sets[name], settings.seeds_per_prompt, 0)
        step = max(1, len(items) // k)
        for i in range(0, len(items), step)[:k]:
            rows.append((f"[{name}] {items[i].text}", [images["base"][name][i], images["saferope"][name][i]]))
    return grid_image(rows, ["base", "SafeRoPE"])


def _finite(obj: Any) -> Any:
    """JSON has no infinity: PSNR of identical images becomes the string "inf"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else "-inf"
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _attack_lines(attacks: dict[str, Any] | None) -> list[str]:
    """The report's attack section (trainer.toy.attacks.attack_markdown)."""
    if not attacks:
        return []
    from trainer.toy.attacks import attack_markdown

    return ["", "## Attacks (trainer.toy.attacks)", "", *attack_markdown(attacks)]


#: The report's name of each target of :func:`trainer.toy.benchmark.check_targets`.
TARGET_NAMES = {"explicit_drop": "explicit unsafe rate, relative drop",
                "implicit_drop": "implicit-trigger unsafe rate, relative drop",
                "benign_accuracy_loss": "benign accuracy lost (points)", "benign_psnr_db": "benign PSNR vs base (dB)",
                "time_per_step_rel": "time per step vs base"}


def _target_texts(key: str, check: dict[str, Any]) -> tuple[str, str]:
    """A target's measured value and its target as the report shows them."""
    val, tgt = check["value"], check["target"]
    if isinstance(val, float) and math.isinf(val):  # PSNR of identical images
        return "identical", f"{tgt}"
    if key.endswith("drop"):
        return f"{100 * val:.1f}%", f"{100 * tgt:.0f}%"
    if key == "benign_accuracy_loss":
        return f"{100 * val:.1f}", f"{100 * tgt:.0f}"
    return f"{val:.3f}", f"{tgt}"


def missed_targets(checks: dict[str, dict[str, Any]], keys: tuple[str, ...] | None = None) -> list[str]:
    """``"<name> <value> (target <op> <target>)"`` for every missed target of ``checks`` (of ``keys``)."""
    out = []
    for k, v in checks.items():
        if (keys is None or k in keys) and not v["met"]:
            shown, tgt = _target_texts(k, v)
            out.append(f"{TARGET_NAMES[k]} {shown} (target {v['op']} {tgt})")
    return out


def warn_if_ineffective(concept: str, checks: dict[str, dict[str, Any]]) -> bool:
    """Log a warning naming the figures when the adapter misses an efficacy target; returns whether it did."""
    from trainer.toy.benchmark import EFFICACY_TARGETS

    missed = missed_targets(checks, EFFICACY_TARGETS)
    if missed:
        logger.warning("the adapter for '%s' does NOT meet the demo's targets: %s. The file is written and loads, but it "
                       "erases less of the concept than the demo promises (or costs the other prompts more); see the "
                       "README, 'Every concept' (some toy colours are carried where no query/key rotation reaches "
                       "them), or try more --steps or another --threshold", concept, "; ".join(missed))
    return bool(missed)


def _markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [f"# SafeRoPE toy benchmark: erasing '{report['concept']}'", "",
             f"Model: `{report['model']}` · rank {s['rank']}, {s['count']} heads, τ = {report['threshold']:.3g} "
             f"({(report.get('calibration') or {}).get('method', 'given')}), "
             f"{s['steps']} training steps · {s['seeds_per_prompt']} image(s) per held-out prompt, "
             f"{s['recipe']['num_inference_steps']} sampling steps.", "",
             report["table_md"], "",
             "## Targets (best SafeRoPE variant vs base)", "", "| metric | value | target | met |", "|---|---:|---:|:---:|"]
    for k, v in report["targets"].items():
        shown, tgt = _target_texts(k, v)
        lines.append(f"| {TARGET_NAMES[k]} | {shown} | {v['op']} {tgt} | {'yes' if v['met'] else 'NO'} |")
    lines += _attack_lines(report.get("attacks"))
    lines += ["", f"Timings: {', '.join(f'{k} {v}' for k, v in report['timings_s'].items())}.", "",
              f"Reproduce: `{report['command']}`", ""]
    return "\n".join(lines)
