"""The "make it hold" study on the toy world: what each hardening variant does to the search attack.

    python scripts/hold_study.py --concept red --out hold_out [--budget 160]

1. ``ours``: the reduced demo's adapter (``python -m trainer demo --quick``, text-token gating).
2. A *training* search (seed 1, ``--budget`` images) against it; its found prompts feed 3 and 4.
3. ``adversarial round``: the same build with the found prompts (trained towards
   :func:`trainer.toy.attacks.found_anchor`) added to the explicit build prompts.
4. ``stacked``: ``ours`` plus a second adapter built on the found prompts alone (each with its own
   bases and calibrated τ), applied together as the ComfyUI node and ``trainer evaluate --stack`` do.
5. ``image tokens``: the reduced demo with bases, head scores and generators from the *image*
   tokens (``select.segment = "img"``, generators on ``img`` in every block) instead of the text.

Each variant is scored on the held-out prompts (the demo's benchmark, one image per prompt) and by an
*evaluation* search with another seed (2) and the same budget, whose found prompts are redrawn on
held-out seeds with the variant and with the base model. A build that its self-check refuses is a row
saying so. Writes ``OUT/hold.md``, ``OUT/hold.json`` and ``OUT/found-<concept>.txt`` (every prompt a
search found); prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TRAIN_SEARCH_SEED, EVAL_SEARCH_SEED = 1, 2


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def _build(out: Path, concept: str, **kw) -> tuple[object | None, dict]:
    """The reduced demo's build and benchmark (base and ours only); ``(adapter or None, report)``."""
    from saferope_engine import load_adapter
    from trainer.commands.demo import DemoSettings, run_demo
    from trainer.core.errors import TrainerError

    settings = DemoSettings.quick(str(out), concept=concept, attack_budget=0, variants=(), **kw)
    try:
        report = run_demo(settings)
    except TrainerError as e:  # e.g. the self-check refused the adapter: a result of the study
        return None, {"error": str(e)}
    rows = {r["variant"]: r for r in report["rows"]}
    return load_adapter(out / "adapter.safetensors"), {
        "threshold": report["threshold"], "self_check": report["self_check"], "base": rows["base"],
        "ours": rows["saferope"], "targets": {k: v["met"] for k, v in report["targets"].items()}}


def _benchmark(pipe, recipe, adapters: list, concept: str) -> dict:
    from trainer.toy.benchmark import Variant, run_benchmark

    results, _ = run_benchmark(pipe, recipe, [Variant("base", "base"), Variant("v", "v", tuple(adapters))],
                               concept=concept, seeds_per_prompt=1, timing_rounds=1)
    by = {r.key: r.row() for r in results}
    return {"base": by["base"], "ours": by["v"]}


def _search(pipe, recipe, adapters: list, concept: str, budget: int, seed: int) -> dict:
    from trainer.toy.attacks import search_attack

    r = search_attack(pipe, recipe, adapters, concept, budget=budget, seed=seed).to_dict()
    return {k: r[k] for k in ("success_rate", "base_rate", "turned", "queries")} | {
        "found": [{k: f[k] for k in ("prompt", "adapter_rate", "base_rate")} for f in r["found"]]}


def _gated_share(pipe, recipe, adapters: list, prompts: list[str]) -> float | None:
    """Share of ``prompts`` with a token above its adapter's τ at some patched site and sampling step
    (risks on the base model's own trajectory, seed 0: where the gate fires, not whether it erases)."""
    import torch

    from saferope_engine.diffusers import observe_qk
    from trainer.stages.calibrate import RiskRecorder
    from trainer.toy.sampling import generate

    if not prompts:
        return None
    recorders = [RiskRecorder(ad) for ad in adapters]

    def observer(*site) -> None:  # (kind, index, which, x, txt_len, img_first)
        for rec in recorders:
            rec(*site)

    with observe_qk(pipe.transformer, observer):
        generate(pipe, prompts, recipe, seed=0, batch_size=len(prompts))
    gated = [rec.gated for rec in recorders if rec.gated is not None]
    return float(torch.stack(gated).any(0).double().mean()) if gated else 0.0  # (adapters, B) -> (B,)


def _encoder_swap(pipe, recipe, prompts: list[str], concept: str) -> dict | None:
    """Base-model concept rate of found prompts given to one text encoder only (the other gets the
    prompt's :func:`found_anchor`), on the attack's held-out seeds: which encoder carries the concept."""
    from trainer.toy.attacks import concept_score, found_anchor
    from trainer.toy.sampling import generate

    if not prompts:
        return None
    seeds = [90_000 + 1000 * EVAL_SEARCH_SEED + i for i in range(3)]
    attack = [p for p in prompts for _ in seeds]
    plain = [found_anchor(p, concept) for p in attack]
    seed = seeds * len(prompts)

    def rate(clip: list[str], t5: list[str]) -> float:
        imgs = generate(pipe, clip, recipe, seed=seed, batch_size=len(clip), prompt_2=t5)
        return float((concept_score(imgs, concept) > 0).mean())

    return {"t5_only": rate(plain, attack), "clip_only": rate(attack, plain), "neither": rate(plain, plain)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concept", default="red", help="toy-world colour (default red)")
    ap.add_argument("--out", required=True, type=Path, help="output folder (must not exist or be empty)")
    ap.add_argument("--budget", type=int, default=160, help="images per search, training and evaluation (default 160)")
    ap.add_argument("--stack-thresholds", type=float, nargs="*", default=[], metavar="TAU",
                    help="also stack a found-prompts adapter built with each given τ (e.g. 0.8 0.7 0.6)")
    args = ap.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        ap.error(f"--out {args.out} exists and is not empty")
    if args.budget < 2 or any(not 0.0 <= t < 1.0 for t in args.stack_thresholds):
        ap.error("--budget must be ≥ 2 and every --stack-thresholds value in [0, 1)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from trainer.toy import load_pipeline, load_recipe, world
    from trainer.toy.benchmark import psnr_text

    pipe, recipe = load_pipeline(), load_recipe()
    c = args.concept
    explicit = tuple(p.text for p in world.explicit_prompts(c, "build"))
    variants: dict[str, dict] = {}

    ours, variants["ours"] = _build(args.out / "ours", c)
    if ours is None:
        raise SystemExit(f"the reduced demo's build failed: {variants['ours']['error']}")
    train_search = _search(pipe, recipe, [ours], c, args.budget, TRAIN_SEARCH_SEED)
    found = tuple(f["prompt"] for f in train_search["found"])
    logging.info("training search: %d prompts found", len(found))
    stacks = {"ours": [ours]}
    if found:
        adv, variants["adversarial round"] = _build(args.out / "adversarial", c, unsafe_prompts=explicit + found)
        second, variants["stacked"] = _build(args.out / "found-only", c, unsafe_prompts=found)
        if adv is not None:
            stacks["adversarial round"] = [adv]
        if second is not None:
            variants["stacked"].update(_benchmark(pipe, recipe, [ours, second], c))
            stacks["stacked"] = [ours, second]
        for tau in args.stack_thresholds:
            name = f"stacked, τ {tau:g}"
            extra, variants[name] = _build(args.out / f"found-only-{tau:g}", c, unsafe_prompts=found, threshold=tau)
            if extra is not None:
                variants[name].update(_benchmark(pipe, recipe, [ours, extra], c))
                stacks[name] = [ours, extra]
    img, variants["image tokens"] = _build(args.out / "image-tokens", c, segment="img",
                                           collect_segments=("txt", "img"), double_segments=("img",),
                                           single_segments=("img",))
    if img is not None:
        stacks["image tokens"] = [img]
    for name, adapters in stacks.items():
        variants[name]["search"] = srch = _search(pipe, recipe, adapters, c, args.budget, EVAL_SEARCH_SEED)
        variants[name]["search"]["gated_share"] = _gated_share(pipe, recipe, adapters,
                                                                [f["prompt"] for f in srch["found"]])
    swap = _encoder_swap(pipe, recipe, [f["prompt"] for f in variants["ours"]["search"]["found"]], c)

    lines = [f"Concept {c}; searches of {args.budget} images (training seed {TRAIN_SEARCH_SEED}: "
             f"{len(found)} prompts found; evaluation seed {EVAL_SEARCH_SEED}).", "",
             "| variant | explicit base → ours | implicit base → ours | benign acc. base → ours | benign PSNR | "
             "evaluation search: found · success with it · base rate · turned · gated |",
             "|---|---:|---:|---:|---:|---|"]
    for name, v in variants.items():
        if "error" in v:
            lines.append(f"| {name} | refused: {v['error'][:160]}… | | | | |")
            continue
        b, o, s = v["base"], v["ours"], v.get("search")
        srch = "—" if s is None else (f"{len(s['found'])} · {_pct(s['success_rate'] if s['found'] else None)} · "
                                      f"{_pct(s['base_rate'] if s['found'] else None)} · {s['turned']} · "
                                      f"{_pct(s['gated_share'])}")
        lines.append(f"| {name} | {_pct(b['explicit_unsafe_rate'])} → {_pct(o['explicit_unsafe_rate'])} | "
                     f"{_pct(b['implicit_unsafe_rate'])} → {_pct(o['implicit_unsafe_rate'])} | "
                     f"{_pct(b['benign_accuracy'])} → {_pct(o['benign_accuracy'])} | "
                     f"{psnr_text(o['benign_psnr_db'])} | {srch} |")
    if swap:
        lines += ["", f"Base model on ours' evaluation-search prompts, one encoder given the prompt and the other its "
                      f"found_anchor: drawn {c} with T5 only {_pct(swap['t5_only'])}, CLIP only "
                      f"{_pct(swap['clip_only'])}, neither {_pct(swap['neither'])}."]
    table = "\n".join(lines) + "\n"
    (args.out / "hold.md").write_text(table)
    every = dict.fromkeys(list(found) + [f["prompt"] for v in variants.values() for f in v.get("search", {}).get("found", [])])
    (args.out / f"found-{c}.txt").write_text("".join(p + "\n" for p in every))  # for scripts/key_ablation.py
    (args.out / "hold.json").write_text(json.dumps({"concept": c, "budget": args.budget, "training_search": train_search,
                                                    "variants": variants, "encoder_swap": swap}, indent=2, default=str) + "\n")
    print(table)


if __name__ == "__main__":
    main()
