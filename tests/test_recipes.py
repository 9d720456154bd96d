"""Shipped recipes: sizes, pairing, keyword hygiene, held-out evaluation lists, config layering, CLI."""

from __future__ import annotations

import fnmatch
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from trainer.core.errors import UsageError
from trainer.core.prompts import read_lines, read_prompts, read_unlearn
from trainer.recipes import CATEGORIES, RECIPES_DIR, adapter_filename, keyword_hits, load_recipe, normalise, shipped_names
from trainer.resolve import resolve

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["mickey-mouse", "nudity", "van-gogh", "violence"]
#: Words that could make a person in the nudity recipe a minor (checked independently of the generator).
MINOR_WORDS = ["girl*", "boy*", "child*", "kid*", "teen*", "schoolgirl*", "schoolboy*", "minor*", "baby", "babies",
               "infant*", "toddler*", "underage", "juvenile*", "youth*", "young*", "cherub*", "cupid", "loli*",
               "little", "petite", "student*", "daughter*", "son"]


def _lists(name: str) -> dict[str, list[str]]:
    r = load_recipe(name)
    u = read_unlearn(r.unsafe, need_anchors=True)
    out = {"unsafe": u.prompts, "anchors": u.anchors, "benign": read_prompts(r.benign, what="benign")}
    for cat, path in r.eval_sets.items():
        out[f"eval:{cat}"] = read_prompts(path, what=cat)
    return out


ALL = {name: _lists(name) for name in SHIPPED}


def test_the_four_recipes_ship():
    assert shipped_names() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_sizes_and_pairing(name):
    lists = ALL[name]
    assert len(lists["unsafe"]) >= 300
    assert len(lists["anchors"]) == len(lists["unsafe"])  # every unsafe prompt has its rewrite
    assert len(lists["benign"]) >= 1000
    for cat in CATEGORIES:
        assert len(lists[f"eval:{cat}"]) >= 50, cat
    assert len(lists["eval:benign"]) >= 50
    r = load_recipe(name)
    for unsafe, anchor in zip(lists["unsafe"], lists["anchors"]):
        assert keyword_hits(unsafe, r.keywords), f"unsafe prompt does not name the concept: {unsafe!r}"
        assert not keyword_hits(anchor, r.keywords), f"anchor names the concept: {anchor!r}"
        assert normalise(anchor) != normalise(unsafe)
    for prompt in lists["eval:explicit"]:
        assert keyword_hits(prompt, r.keywords), prompt
    for prompt in lists["eval:indirect"]:
        assert not keyword_hits(prompt, r.keywords), f"indirect prompt names the concept: {prompt!r}"
    for key, prompts in lists.items():
        assert len({normalise(p) for p in prompts}) == len(prompts), f"{name} {key}: duplicates"


def test_benign_lists_touch_no_recipe_concept():
    words = [w for n in SHIPPED for w in load_recipe(n).keywords + load_recipe(n).related]
    benign = ALL["nudity"]["benign"] + ALL["nudity"]["eval:benign"]
    bad = [(p, keyword_hits(p, words)) for p in benign if keyword_hits(p, words)]
    assert not bad, bad[:5]
    for name in SHIPPED:  # the shared lists, one copy
        assert load_recipe(name).benign == load_recipe("nudity").benign


def test_evaluation_lists_are_held_out():
    training = {p for lists in ALL.values() for k in ("unsafe", "anchors", "benign") for p in lists[k]}
    evals = {(name, k): lists[k] for name, lists in ALL.items() for k in lists if k.startswith("eval:")}
    norm_training = {normalise(p) for p in training}
    for (name, key), prompts in evals.items():
        assert not set(prompts) & training, (name, key)
        assert not {normalise(p) for p in prompts} & norm_training, (name, key)
    per_recipe = {}
    for (name, key), prompts in evals.items():  # the categories of one recipe are disjoint too
        for p in prompts:
            assert per_recipe.setdefault((name, normalise(p)), key) == key, (name, p)


def test_nudity_recipe_names_only_adults():
    lists = ALL["nudity"]
    prompts = [p for k, v in lists.items() if k not in ("benign", "eval:benign") for p in v]
    bad = [p for p in prompts if keyword_hits(p, MINOR_WORDS)]
    assert not bad, bad[:5]


def test_generator_reproduces_the_committed_files(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_recipes.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.txt"))
    shipped = sorted(p.relative_to(RECIPES_DIR) for p in RECIPES_DIR.rglob("*.txt"))
    assert made == shipped and len(made) == 2 + 4 * len(SHIPPED)
    for rel in made:
        assert (tmp_path / rel).read_bytes() == (RECIPES_DIR / rel).read_bytes(), \
            f"{rel} is out of date: run scripts/build_recipes.py"


def test_package_data_ships_every_recipe_file():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["trainer.recipes"]
    files = [p.relative_to(RECIPES_DIR).as_posix() for p in RECIPES_DIR.rglob("*")
             if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts]
    assert len(files) == 2 + 5 * len(SHIPPED)
    unmatched = [f for f in files if not any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)]
    assert not unmatched
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("nudenet") for d in extras["nudenet"]) and "comfyui-saferope[nudenet]" in extras["test"]


def test_keyword_matching_is_by_whole_word():
    assert keyword_hits("a horse in a stable", ["stabbed", "stabbing"]) == []
    assert keyword_hits("a knight stabbed twice", ["stabbed"]) == ["stabbed"]
    assert keyword_hits("Van Gogh's sunflowers", ["van gogh"]) == ["van gogh"]
    assert keyword_hits("a mutilated statue", ["mutilat*"]) == ["mutilated"]
    assert keyword_hits("Sussex downs", ["sex"]) == [] and keyword_hits("a DISNEYLAND ride", ["disney*"])
    assert normalise("  A Nude, woman!  ") == normalise("a nude woman")


# ---------------------------------------------------------------------------------------------
# Config layering
# ---------------------------------------------------------------------------------------------
def test_recipe_provides_prompts_and_family_defaults_and_flags_win(tmp_path):
    r = load_recipe("nudity")
    cfg = resolve(overrides={"recipe": "nudity", "model": "toy"})
    assert cfg.recipe == "nudity" and cfg.concepts == ["nudity"]
    assert cfg.prompts.unsafe == str(r.unsafe) and cfg.prompts.safe == str(r.benign)
    assert set(cfg.evaluate.sets) == {*CATEGORIES, "benign"} and cfg.evaluate.scorers == ["nudenet"]
    flux1 = r.defaults["flux1"]
    assert cfg.select.rank == flux1["select"]["rank"] and cfg.train.steps == flux1["train"]["steps"]
    assert cfg.train.threshold == flux1["train"]["threshold"] and cfg.dtype == flux1["dtype"]
    # A config file overrides the recipe; flags override the config file.
    conf = tmp_path / "c.toml"
    conf.write_text('recipe = "nudity"\nmodel = "toy"\n[select]\nrank = 3\n[train]\nsteps = 7\n')
    cfg = resolve(config_file=str(conf), overrides={"train.steps": 9, "train.threshold": 0.7})
    assert (cfg.select.rank, cfg.train.steps, cfg.train.threshold) == (3, 9, 0.7)
    assert cfg.select.fraction == flux1["select"]["fraction"]  # still the recipe's
    # Without a model there is no family: recipe prompts, trainer defaults.
    cfg = resolve(overrides={"recipe": "violence"})
    assert cfg.concepts == ["graphic violence"] and cfg.select.rank == 4 and cfg.train.steps == 300


def test_stored_recipe_and_a_different_one(tmp_path):
    from trainer.core.config import to_toml

    built = resolve(overrides={"recipe": "nudity", "model": "toy", "train.steps": 11})
    stored = tmp_path / "config.resolved.toml"
    stored.write_text(to_toml(built))
    again = resolve(run_config=stored)  # a later command on the run: its own values, not the recipe's again
    assert again.recipe == "nudity" and again.train.steps == 11
    other = resolve(run_config=stored, overrides={"recipe": "van-gogh"})
    assert other.recipe == "van-gogh" and other.evaluate.sets["explicit"] == str(load_recipe("van-gogh").eval_files["explicit"])


def _user_recipe(folder: Path, *, top: str = "", defaults: str = "", scorers: str = '["none"]') -> Path:
    """A small recipe folder of one's own (``--recipe PATH``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "unsafe.txt").write_text("zorblax quibble\ttree house\nred zorblax\tred tree\n")
    (folder / "benign.txt").write_text("a cat\na dog\n")
    (folder / "benign_eval.txt").write_text("a car\n")
    for cat in CATEGORIES:
        (folder / f"eval_{cat}.txt").write_text(f"{cat} one\n{cat} two\n{cat} three\n")
    (folder / "recipe.toml").write_text(
        f'concept = "zorblax"\nkeywords = ["zorblax"]\nscorers = {scorers}\n{top}\n'
        f'[files]\nbenign = "benign.txt"\nbenign_eval = "benign_eval.txt"\n\n{defaults}')
    return folder


def test_recipe_folder_relative_to_the_config_file(tmp_path, monkeypatch):
    _user_recipe(tmp_path / "cfg" / "mine", defaults="[defaults.flux1.select]\nrank = 5\n")
    conf = tmp_path / "cfg" / "run.toml"
    conf.write_text('recipe = "mine"\nmodel = "toy"\n')
    monkeypatch.chdir(tmp_path)
    cfg = resolve(config_file=str(conf))
    assert cfg.recipe == str((tmp_path / "cfg" / "mine").resolve()) and cfg.select.rank == 5
    assert cfg.prompts.safe == str((tmp_path / "cfg" / "mine" / "benign.txt").resolve())
    assert load_recipe(cfg.recipe).name == "mine" and not load_recipe(cfg.recipe).shipped


@pytest.mark.parametrize("kind, text, message", [
    ("top", "", None),
    ("top", "colour = 1", "unknown key 'colour'"),
    ("defaults", "[defaults.flux3]\nseed = 1", "unknown model family"),
    ("defaults", "[defaults.flux1]\nmodel = 'x'", "may not set model"),
    ("defaults", "[defaults.flux1.train]\nstep = 1", "unknown config key 'train.step'"),
    ("defaults", "[defaults.flux1.train]\nthreshold = 2.0", "'train.threshold' must be in [0, 1)"),
    ("scorers", '["lpips"]', "unknown scorer 'lpips'"),
])
def test_bad_recipe_files_are_named(tmp_path, kind, text, message):
    import re

    folder = _user_recipe(tmp_path / "r", **{kind: text})
    if message is None:
        assert load_recipe(str(folder)).concept == "zorblax"
        return
    with pytest.raises(UsageError, match=re.escape(message)) as e:
        load_recipe(str(folder))
    assert "recipe.toml" in str(e.value) and "\n" not in str(e.value)


def test_missing_files_and_unknown_names(tmp_path):
    folder = _user_recipe(tmp_path / "r")
    (folder / "eval_indirect.txt").unlink()
    with pytest.raises(UsageError, match=r"files.indirect .*eval_indirect.txt' not found"):
        load_recipe(str(folder))
    with pytest.raises(UsageError, match="unknown recipe 'nudityy'.*mickey-mouse, nudity, van-gogh, violence"):
        load_recipe("nudityy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="has no recipe.toml"):
        load_recipe(str(tmp_path / "empty"))


def test_cli_recipes_and_bad_recipe_writes_nothing(cli, tmp_path):
    code, out, err = cli("recipes")
    assert code == 0, err
    for name in SHIPPED:
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        sizes = load_recipe(name).sizes()
        assert f"  {sizes['unsafe']}  " in line and "flux1, flux2, chroma, hunyuan_image, qwen_image, z_image" in line
    code, out, _ = cli("recipes", "--json", "nudity")
    (row,) = json.loads(out)
    assert row["sizes"]["unsafe"] == len(ALL["nudity"]["unsafe"]) and row["scorers"] == ["nudenet"]
    out_dir = tmp_path / "run"
    code, _, err = cli("build", "--recipe", "nope", "--model", "toy", "--out", out_dir)
    assert code == 2 and "unknown recipe 'nope'" in err and len(err.strip().splitlines()) == 1
    assert not out_dir.exists()


def test_model_family(tiny_flux, tmp_path):
    from trainer.families.models import model_family

    assert model_family("toy") == "flux1" and model_family(str(tiny_flux)) == "flux1"
    import shutil

    shutil.copytree(tiny_flux, tmp_path / "qwen")  # a whole folder: only the transformer's class is wrong
    other = tmp_path / "qwen" / "transformer"
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "_class_name": "QwenImageTransformer2DModel"}))
    with pytest.raises(UsageError, match="'QwenImageTransformer2DModel' is not a FLUX.1 transformer"):
        model_family(str(tmp_path / "qwen"))
    with pytest.raises(UsageError, match="no such folder"):
        model_family(str(tmp_path / "nothing"))


def test_workflows_name_the_walkthrough_adapter():
    name = adapter_filename("nudity", "black-forest-labs/FLUX.1-dev")
    assert name == adapter_filename("nudity", "/models/FLUX.1-dev/") == "saferope-nudity-flux1-dev.safetensors"
    for wf in sorted((ROOT / "example_workflows").glob("*.json")):
        if wf.stem == "saferope_toy_demo":  # the toy model's workflow loads the toy demo's adapter (test_nodes_toy.py)
            continue
        loaders = [n for n in json.loads(wf.read_text())["nodes"] if n["type"] == "SafeRoPEAdapterLoader"]
        assert loaders and all(n["widgets_values"][0] == name for n in loaders), wf.name
    readme = (ROOT / "README.md").read_text()
    assert f"ComfyUI/models/saferope/{name}" in readme


TINY_DEFAULTS = """
[defaults.flux1]
device = "cpu"
[defaults.flux1.collect]
sigmas = [1.0, 0.6]
batch_size = 3
[defaults.flux1.select]
rank = 2
count = 4
kinds = ["double"]
[defaults.flux1.train]
steps = 4
batch_size = 2
lr = 0.05
threshold = 0.9
rollout_steps = 4
unlearn_sigmas = [0.5, 1.0]
checkpoint_every = 4
[defaults.flux1.evaluate]
steps = 2
"""


def test_build_and_evaluate_with_a_recipe_folder(tiny_flux, tmp_path, cli, single_thread):
    """`build --recipe DIR` takes prompts, concept and defaults from the folder; `evaluate` on the run finds them."""
    from trainer_fixtures import SAFE, UNSAFE

    from saferope_engine import load_adapter

    folder = _user_recipe(tmp_path / "zorb", defaults=TINY_DEFAULTS)
    (folder / "unsafe.txt").write_text("".join(f"{u}\t{a}\n" for u, a in UNSAFE))
    (folder / "benign.txt").write_text("\n".join(SAFE) + "\n")
    out = tmp_path / "run"
    code, stdout, err = cli("-q", "build", "--recipe", folder, "--model", tiny_flux, "--out", out, "--steps", "3")
    assert code == 0, err
    adapter = load_adapter(out / "adapter.safetensors")
    assert adapter.meta.concepts == ("zorblax",) and adapter.meta.rank == 2
    assert adapter.meta.threshold == pytest.approx(0.9)
    cfg = adapter.meta.config["config"]
    assert cfg["recipe"] == str(folder.resolve()) and cfg["train"]["steps"] == 3  # the flag beat the recipe's 4
    assert f"ComfyUI/models/saferope/{adapter_filename('zorb', 'model')}" in stdout
    code, stdout, err = cli("-q", "evaluate", "--out", out, "--limit", "2")
    assert code == 0, err
    doc = json.loads((out / "evaluate" / "results.json").read_text())
    per_set = {c: min(2, len(read_lines(p, what=c))) for c, p in load_recipe(str(folder)).eval_sets.items()}
    assert len(doc["rows"]) == sum(per_set.values()) * 1 * 2  # prompts × seeds × variants
    assert {r["category"] for r in doc["rows"]} == {*CATEGORIES, "benign"}
    assert doc["unsafe_by"] is None and all(r["unsafe"] is None for r in doc["rows"])
    assert "No unsafe-rate scorer ran" in (out / "evaluate" / "report.md").read_text()
