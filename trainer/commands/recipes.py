"""``recipes``: the shipped concept recipes (or the recipe folders given) with their sizes."""

from __future__ import annotations

import json
from typing import Any

from ..recipes import CATEGORIES, RECIPES_DIR, Recipe, load_recipe, shipped_names
from .base import add_command


def register(sub) -> None:
    p = add_command(sub, "recipes", summary="list the shipped concept recipes and their sizes",
                    description="List the shipped concept recipes (or the recipe folders given) with their prompt\n"
                                "counts per list and the model families they have defaults for. Build one with\n"
                                "`build --recipe NAME --model FOLDER --out DIR`; evaluate with `evaluate --recipe NAME`.",
                    example="python -m trainer recipes\n"
                            "python -m trainer build --recipe nudity --model /models/FLUX.1-dev --out runs/nudity")
    p.add_argument("recipes", nargs="*", metavar="RECIPE", help="recipe names or folders (default: every shipped one)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run_list)


def describe(recipe: Recipe) -> dict[str, Any]:
    """A recipe's listing entry: name, concept, folder, sizes, scorers and families with defaults."""
    return {"name": recipe.name, "spec": recipe.spec, "concept": recipe.concept, "title": recipe.title,
            "folder": str(recipe.folder), "shipped": recipe.shipped, "sizes": recipe.sizes(),
            "scorers": list(recipe.scorers), "families": list(recipe.defaults)}


def _run_list(args) -> int:
    recipes = [load_recipe(s) for s in (args.recipes or shipped_names())]
    rows = [describe(r) for r in recipes]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = ["recipe", "concept", "unsafe", "benign", "explicit", "indirect", "paraphrase", "benign eval",
            "scorers", "families with defaults"]
    table = [head] + [[r["spec"] if not r["shipped"] else r["name"], r["title"], *(str(r["sizes"][k]) for k in (
        "unsafe", "benign", *CATEGORIES, "benign_eval")), ",".join(r["scorers"]), ", ".join(r["families"])]
        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    print(f"\nunsafe = prompts paired with a safe rewrite (the anchor); eval lists are held out from training.\n"
          f"shipped recipes: {RECIPES_DIR}  (--recipe NAME, or --recipe PATH for a folder of your own)")
    return 0
