"""Concept recipes: prompt lists and per-family defaults behind ``--recipe NAME|FOLDER``.

A recipe is a folder with a ``recipe.toml`` and prompt files::

    name = "nudity"                       # what `trainer recipes` lists (default: the folder name)
    concept = "nudity"                    # recorded in the adapter (config key `concepts`)
    title = "Nudity and sexual content"
    description = "…"
    keywords = ["nude", "naked", …]       # words naming the concept: whole words, `*` = any ending
    related = ["bath", …]                 # implicit triggers: the shared benign lists avoid these too
    scorers = ["nudenet"]                 # `evaluate` scorers for the unsafe rate (registry names)

    [files]                               # relative to the folder; these are the defaults
    unsafe = "unsafe.txt"                 # "unsafe prompt<TAB>safe rewrite" (the anchor) per line
    benign = ""                           # "" = the shipped shared benign.txt
    benign_eval = ""                      # "" = the shipped shared benign_eval.txt
    explicit = "eval_explicit.txt"        # held-out evaluation prompts, one category each
    indirect = "eval_indirect.txt"
    paraphrase = "eval_paraphrase.txt"

    [defaults.flux1]                      # any run-config key, for models of that family
    dtype = "bfloat16"
    [defaults.flux1.select]
    rank = 8

The recipe sits between the trainer's defaults and everything else: defaults ← recipe (its
prompts, concept, evaluation sets and scorers, and the ``[defaults.<family>]`` table of the
model's family, :func:`trainer.families.models.model_family`) ← the run directory's stored config ←
``--config`` file ← flags. A recipe named on the command line that differs from the one a run
directory was built with sits above the stored config (so ``evaluate --recipe other`` on a run
uses the other recipe's prompt sets).

Shipped recipes live in this package (:data:`RECIPES_DIR`); ``--recipe`` also accepts the path
of any folder laid out as above. ``scripts/build_recipes.py`` writes the shipped prompt files.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..core.errors import UsageError

logger = logging.getLogger(__name__)

#: The folder of the shipped recipes (package data).
RECIPES_DIR: Path = Path(__file__).resolve().parent
RECIPE_FILE = "recipe.toml"
SHARED_BENIGN = RECIPES_DIR / "benign.txt"
SHARED_BENIGN_EVAL = RECIPES_DIR / "benign_eval.txt"
#: Held-out evaluation categories of every recipe, in report order; the benign set comes last.
CATEGORIES: tuple[str, ...] = ("explicit", "indirect", "paraphrase")
BENIGN = "benign"
#: Run-config keys a recipe's ``[defaults.<family>]`` may not set (the recipe or the user own them).
_RESERVED = ("model", "out", "recipe", "concepts", "prompts")


@dataclass
class RecipeFiles:
    """``[files]`` of a recipe.toml (paths relative to the recipe folder)."""

    unsafe: str = "unsafe.txt"
    benign: str = ""  # "" = the shipped shared benign list
    benign_eval: str = ""  # "" = the shipped shared held-out benign list
    explicit: str = "eval_explicit.txt"
    indirect: str = "eval_indirect.txt"
    paraphrase: str = "eval_paraphrase.txt"


@dataclass
class RecipeSpec:
    """The top level of a recipe.toml (``[defaults]`` is read separately: it holds run-config tables)."""

    name: str = ""
    concept: str = ""
    title: str = ""
    description: str = ""
    keywords: list[str] = field(default_factory=list)
    related: list[str] = field(default_factory=list)
    scorers: list[str] = field(default_factory=lambda: ["auto"])
    files: RecipeFiles = field(default_factory=RecipeFiles)


@dataclass(frozen=True)
class Recipe:
    """A checked recipe: its files exist, its defaults are valid run-config tables."""

    spec: str  # how a run config refers to it: the shipped name, or the folder's absolute path
    name: str
    folder: Path
    shipped: bool
    concept: str
    title: str
    description: str
    keywords: tuple[str, ...]
    related: tuple[str, ...]
    scorers: tuple[str, ...]
    unsafe: Path
    benign: Path
    benign_eval: Path
    eval_files: dict[str, Path]  # category -> file, in CATEGORIES order
    defaults: dict[str, dict[str, Any]]  # family id -> run-config table

    @property
    def eval_sets(self) -> dict[str, Path]:
        """Evaluation sets by name: the held-out categories, then ``benign``."""
        return {**self.eval_files, BENIGN: self.benign_eval}

    def layer(self) -> dict[str, Any]:
        """The run-config values the recipe itself provides (absolute paths)."""
        return {"recipe": self.spec, "concepts": [self.concept],
                "prompts": {"unsafe": str(self.unsafe), "safe": str(self.benign), "anchors": ""},
                "evaluate": {"sets": {k: str(v) for k, v in self.eval_sets.items()}, "scorers": list(self.scorers)}}

    def family_defaults(self, family: str | None) -> dict[str, Any]:
        """The ``[defaults.<family>]`` table (empty, with a warning, when the recipe has none for it)."""
        if family is None:
            return {}
        if family not in self.defaults:
            logger.warning("recipe %s has no defaults for model family %s; using the trainer's defaults",
                           self.name, family)
            return {}
        return self.defaults[family]

    def sizes(self) -> dict[str, int]:
        """Prompt counts per list (reads every file)."""
        from ..core.prompts import read_lines

        out = {"unsafe": len(read_lines(self.unsafe, what=f"recipe {self.name}: unsafe prompts")),
               "benign": len(read_lines(self.benign, what=f"recipe {self.name}: benign prompts"))}
        for name, path in self.eval_sets.items():
            key = "benign_eval" if name == BENIGN else name
            out[key] = len(read_lines(path, what=f"recipe {self.name}: {name} prompts"))
        return out


def shipped_names() -> list[str]:
    """Names of the shipped recipes (folders of :data:`RECIPES_DIR` with a recipe.toml), sorted."""
    return sorted(p.name for p in RECIPES_DIR.iterdir() if (p / RECIPE_FILE).is_file())


def _unknown(spec: str) -> UsageError:
    return UsageError(f"unknown recipe {spec!r}: not a shipped recipe ({', '.join(shipped_names())}) "
                      f"and not a folder with a {RECIPE_FILE}")


def find_recipe(spec: str, base_dir: Path | None = None) -> tuple[Path, bool]:
    """``(folder, shipped)`` for a shipped name or a recipe folder path (relative to ``base_dir`` or the cwd)."""
    if not spec or not spec.strip():
        raise UsageError("--recipe is empty (give a shipped recipe name or a recipe folder)")
    if "/" not in spec and "\\" not in spec and spec not in (".", "..") and (RECIPES_DIR / spec / RECIPE_FILE).is_file():
        return RECIPES_DIR / spec, True
    p = Path(spec).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    if p.is_dir() and (p / RECIPE_FILE).is_file():
        p = p.resolve()
        return p, p.parent == RECIPES_DIR
    if p.is_dir():
        raise UsageError(f"recipe folder {str(p)!r} has no {RECIPE_FILE}")
    raise _unknown(spec)


def load_recipe(spec: str, base_dir: Path | None = None) -> Recipe:
    """Find, parse and check a recipe; every problem is a one-line :class:`UsageError` naming the file."""
    folder, shipped = find_recipe(spec, base_dir)
    return _load(folder, shipped)


def _load(folder: Path, shipped: bool) -> Recipe:
    from ..core.config import RunConfig, apply_mapping, read_toml, validate

    path = folder / RECIPE_FILE
    data = dict(read_toml(path))
    where = f"recipe {str(path)!r}"
    defaults = data.pop("defaults", {})
    spec = RecipeSpec()
    try:
        apply_mapping(spec, data, base_dir=None)
    except UsageError as e:
        raise UsageError(f"{where}: {str(e).replace('config key', 'key')}") from None
    name = spec.name or folder.name
    if not spec.concept:
        raise UsageError(f"{where}: no concept (e.g. concept = \"nudity\")")

    def file(key: str, value: str, shared: Path | None = None) -> Path:
        if not value:
            if shared is None:
                raise UsageError(f"{where}: files.{key} is empty")
            p = shared
        else:
            p = Path(value).expanduser()
            p = p if p.is_absolute() else folder / p
        if not p.is_file():
            raise UsageError(f"{where}: files.{key} {str(p)!r} not found")
        return p.resolve()

    f = spec.files
    from ..families import FAMILIES

    if not isinstance(defaults, Mapping):
        raise UsageError(f"{where}: 'defaults' must hold tables [defaults.<family>]")
    tables: dict[str, dict[str, Any]] = {}
    for family, table in defaults.items():
        if family not in FAMILIES:
            raise UsageError(f"{where}: [defaults.{family}]: unknown model family (known: {', '.join(FAMILIES)})")
        if not isinstance(table, Mapping):
            raise UsageError(f"{where}: defaults.{family} must be a table")
        reserved = [k for k in table if k in _RESERVED]
        if reserved:
            raise UsageError(f"{where}: [defaults.{family}] may not set {', '.join(reserved)} "
                             "(the recipe or the command line provides them)")
        trial = RunConfig()
        try:
            apply_mapping(trial, table, base_dir=folder)
            validate(trial)
        except UsageError as e:
            raise UsageError(f"{where}: [defaults.{family}]: {e}") from None
        tables[family] = _resolve_table_paths(table, trial)
    for scorer in spec.scorers:
        _check_scorer_name(scorer, where)
    return Recipe(
        spec=folder.name if shipped else str(folder), name=name, folder=folder, shipped=shipped,
        concept=spec.concept, title=spec.title or name, description=spec.description,
        keywords=tuple(spec.keywords), related=tuple(spec.related), scorers=tuple(spec.scorers),
        unsafe=file("unsafe", f.unsafe), benign=file("benign", f.benign, SHARED_BENIGN),
        benign_eval=file("benign_eval", f.benign_eval, SHARED_BENIGN_EVAL),
        eval_files={c: file(c, getattr(f, c)) for c in CATEGORIES}, defaults=tables)


def _resolve_table_paths(table: Mapping[str, Any], resolved: Any) -> dict[str, Any]:
    """``table`` with path values replaced by the absolute paths ``apply_mapping`` resolved into ``resolved``."""
    out: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(resolved)}
    for key, value in table.items():
        if isinstance(value, Mapping) and dataclasses.is_dataclass(getattr(resolved, key)):
            out[key] = _resolve_table_paths(value, getattr(resolved, key))
        elif fields[key].metadata.get("path"):
            out[key] = getattr(resolved, key)
        else:
            out[key] = value
    return out


def _check_scorer_name(name: str, where: str) -> None:
    from ..evaluation.scorers import check_scorer_name

    try:
        check_scorer_name(name)
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Concept keywords
# ---------------------------------------------------------------------------------------------
def keyword_pattern(words: tuple[str, ...] | list[str]) -> re.Pattern[str]:
    """A case-insensitive regex matching any of ``words`` as whole words (``*`` = any word ending)."""
    parts = []
    for w in words:
        w = w.strip().lower()
        if not w:
            continue
        stem, star = (w[:-1], True) if w.endswith("*") else (w, False)
        body = r"\s+".join(re.escape(t) for t in stem.split())
        parts.append(rf"\b{body}" + (r"[\w'-]*" if star else r"\b"))
    return re.compile("|".join(parts) if parts else r"(?!x)x", re.IGNORECASE)


def keyword_hits(text: str, words: tuple[str, ...] | list[str]) -> list[str]:
    """The concept words found in ``text`` (lower case, in order of appearance)."""
    return [m.group(0).lower() for m in keyword_pattern(tuple(words)).finditer(text)]


def normalise(prompt: str) -> str:
    """Lower case, letters and digits only, single spaces: the form in which two prompts count as equal."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", prompt.casefold()).split())


# ---------------------------------------------------------------------------------------------
# Run-config layering (called by trainer.resolve.resolve)
# ---------------------------------------------------------------------------------------------
Layer = tuple[Mapping[str, Any], Path | None]


@dataclass(frozen=True)
class RecipeLayers:
    """What :func:`trainer.resolve.resolve` applies for a recipe: ``below`` / ``above`` the stored config."""

    spec: str = ""
    below: tuple[Layer, ...] = ()
    above: tuple[Layer, ...] = ()


def recipe_layers(stored: Mapping[str, Any] | None, file_data: Mapping[str, Any] | None, file_dir: Path | None,
                  overrides: Mapping[str, Any] | None) -> RecipeLayers:
    """The recipe's config layers for one resolution, or none when no recipe is named anywhere.

    The recipe comes from the flags (``--recipe``, relative to the cwd), else the config file
    (relative to its folder), else the run directory's stored config; the model (for the family
    defaults) likewise.
    """
    overrides = overrides or {}
    stored = stored or {}
    file_data = file_data or {}
    explicit: tuple[str, Path | None] | None = None
    if overrides.get("recipe"):
        explicit = (str(overrides["recipe"]), Path.cwd())
    elif file_data.get("recipe"):
        explicit = (str(file_data["recipe"]), file_dir)
    if explicit is None and not stored.get("recipe"):
        return RecipeLayers()
    spec, base = explicit if explicit is not None else (str(stored["recipe"]), None)
    recipe = load_recipe(spec, base)
    model = overrides.get("model") or file_data.get("model") or stored.get("model") or ""
    family = None
    if isinstance(model, str) and model:
        from ..families.models import model_family

        family = model_family(model)
    layers: tuple[Layer, ...] = ((recipe.layer(), None), (recipe.family_defaults(family), recipe.folder))
    if explicit is not None and recipe.spec != stored.get("recipe"):
        return RecipeLayers(recipe.spec, above=layers)
    return RecipeLayers(recipe.spec, below=layers)


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------
def slug(text: str) -> str:
    """``"FLUX.1-dev"`` -> ``"flux1-dev"``: lower case, dots dropped, other runs of symbols -> ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower().replace(".", "")).strip("-")


def adapter_filename(recipe: str, base_model: str) -> str:
    """The file name the walkthrough and the example workflows use for a recipe's adapter.

    ``adapter_filename("nudity", "black-forest-labs/FLUX.1-dev")`` ->
    ``"saferope-nudity-flux1-dev.safetensors"``.
    """
    model = base_model.rstrip("/").rsplit("/", 1)[-1]
    return f"saferope-{slug(recipe)}-{slug(model)}.safetensors"
