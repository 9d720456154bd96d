"""The toy demo for every concept of the toy world, one README row each, and two stacked adapters.

    python scripts/concepts_table.py --out concepts_out [--quick] [--concepts red blue] [--stack red blue]

Runs ``python -m trainer demo --concept C`` (``run_demo``) for each concept into ``OUT/C``, then
samples the held-out prompts with the ``--stack`` adapters applied together (explicit prompts of each
stacked concept; benign prompts: the other colours, grey and colourless). Writes ``OUT/concepts.md``
(the table) and ``OUT/concepts.json``; prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _row(report: dict) -> dict:
    rows = {r["variant"]: r for r in report["rows"]}
    b, o = rows["base"], rows["saferope"]
    return {"concept": report["concept"], "threshold": report["threshold"],
            "method": (report.get("calibration") or {}).get("method", "given"),
            "base": {k: b[k] for k in ("explicit_unsafe_rate", "implicit_unsafe_rate", "benign_accuracy")},
            "ours": {k: o[k] for k in ("explicit_unsafe_rate", "implicit_unsafe_rate", "benign_accuracy",
                                       "benign_psnr_db")},
            "targets": {k: v["met"] for k, v in report["targets"].items()}}


def _md(rows: list[dict], stack: dict | None) -> str:
    from trainer.toy.benchmark import EFFICACY_TARGETS, psnr_text

    def pct(x: float) -> str:
        return f"{100 * x:.0f}%"

    lines = ["| concept | τ (how) | explicit base → ours | implicit base → ours | benign acc. base → ours | "
             "benign PSNR | E/I/B/PSNR targets met |", "|---|---|---:|---:|---:|---:|:---:|"]
    for r in rows:
        b, o, t = r["base"], r["ours"], r["targets"]
        met = "/".join("yes" if t[k] else "NO" for k in EFFICACY_TARGETS)
        lines.append(f"| {r['concept']} | {r['threshold']:.3f} ({r['method']}) | {pct(b['explicit_unsafe_rate'])} → "
                     f"{pct(o['explicit_unsafe_rate'])} | {pct(b['implicit_unsafe_rate'])} → "
                     f"{pct(o['implicit_unsafe_rate'])} | {pct(b['benign_accuracy'])} → {pct(o['benign_accuracy'])} | "
                     f"{psnr_text(o['benign_psnr_db'])} | {met} |")
    if stack:
        lines += ["", f"Stacked {' + '.join(stack['concepts'])} (same seeds):", "",
                  "| prompts | base: drawn in the concept | stacked: drawn in the concept | accuracy base → stacked |",
                  "|---|---:|---:|---:|"]
        for name, s in stack["sets"].items():
            lines.append(f"| {name} | {pct(s['base_concept_rate'])} | {pct(s['stack_concept_rate'])} | "
                         f"{pct(s['base_accuracy'])} → {pct(s['stack_accuracy'])} |")
    return "\n".join(lines) + "\n"


def _stack(pipe, recipe, adapters: dict, concepts: list[str], seeds_per_prompt: int) -> dict:
    from trainer.toy import world
    from trainer.toy.benchmark import Variant, expand, sample_variant
    from trainer.toy.evaluate import score

    sets = {f"explicit {c}": world.explicit_prompts(c, "eval") for c in concepts}
    keep = [c for c in world.CONCEPTS if c not in concepts]
    benign = [p for p in world.benign_prompts(concepts[0], "eval") if p.colour not in concepts]
    sets[f"benign ({', '.join(keep)}, grey, colourless)"] = benign
    base, stacked = Variant("base", "base"), Variant("stack", "stack", tuple(adapters[c] for c in concepts))
    out = {}
    for i, (name, prompts) in enumerate(sets.items()):
        items, seeds = expand(prompts, seeds_per_prompt, 20_000 + 1000 * i)
        texts = [p.text for p in items]
        res = {}
        for v in (base, stacked):
            imgs = sample_variant(pipe, recipe, v, texts, seeds)
            concept = name.split()[1] if name.startswith("explicit") else concepts[0]
            s = score(items, imgs, concept)
            rate = s.concept_rate if name.startswith("explicit") else sum(
                s.colours.get(c, 0) for c in concepts) / max(s.n, 1)
            res[v.key] = (rate, s.both_acc)
        out[name] = {"base_concept_rate": res["base"][0], "stack_concept_rate": res["stack"][0],
                     "base_accuracy": res["base"][1], "stack_accuracy": res["stack"][1], "n": len(items)}
    return {"concepts": concepts, "sets": out}


def main(argv: list[str] | None = None) -> int:
    from trainer.commands.demo import DemoSettings, run_demo
    from trainer.toy import world

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="the demo's reduced setting")
    p.add_argument("--concepts", nargs="+", default=list(world.CONCEPTS))
    p.add_argument("--stack", nargs="*", default=["red", "blue"], help="concepts whose adapters are stacked ('' = none)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, adapters = [], {}
    for c in args.concepts:
        settings = DemoSettings.quick(str(out / c), concept=c) if args.quick else DemoSettings(out=str(out / c), concept=c)
        if (out / c / "report.json").is_file():  # resume a partial run
            report = json.loads((out / c / "report.json").read_text())
        else:
            report = run_demo(settings)
        rows.append(_row(report))
        adapters[c] = out / c / "adapter.safetensors"
        (out / "concepts.md").write_text(_md(rows, None))
    stack = None
    if args.stack and all(c in adapters for c in args.stack):
        from saferope_engine import load_adapter
        from trainer.toy import TOY_MODEL_DIR
        from trainer.toy.config import Recipe
        from trainer.toy.sampling import load_pipeline

        loaded = {c: load_adapter(adapters[c]) for c in args.stack}
        stack = _stack(load_pipeline(), Recipe.load(TOY_MODEL_DIR), loaded, list(args.stack),
                       1 if args.quick else DemoSettings.seeds_per_prompt)
    table = _md(rows, stack)
    (out / "concepts.md").write_text(table)
    (out / "concepts.json").write_text(json.dumps({"rows": rows, "stack": stack}, indent=2, default=str) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
