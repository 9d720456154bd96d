"""The stages of ``collect``, ``select``, ``train`` and ``build``: checks first, then the stages in order.

Every input (config, prompt files, model folder and its weight files, shapes, the output
directory, run-directory state: statistics and checkpoints verified, damaged ones skipped with a
note) is checked before anything is written, so bad input leaves the output directory untouched.
``build`` runs the three stages from one config file; each stage can also run alone on the same
``--out``. The commands themselves are :mod:`trainer.commands.build` and its siblings.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import RunConfig, jsonable
from ..core.errors import UsageError
from ..core.prompts import UnlearnPrompts, read_prompts, read_unlearn
from ..core.rundir import DamagedFileError, RunDir, check_output_dir
from ..core.runtime import launched_processes
from ..families.models import ModelInfo, image_size, max_sequence_length, resolve_model
from . import objectives
from .collect import SETS, pick_stats, stats_metadata

logger = logging.getLogger(__name__)

STAGES = {"collect": ("collect",), "select": ("select",), "train": ("train",), "build": ("collect", "select", "train")}

@dataclass
class Plan:
    """Everything a command needs, checked before anything is written."""

    command: str
    cfg: RunConfig
    run: RunDir
    resume: str | None
    info: ModelInfo | None = None
    shapes: Any = None  # saferope_engine.ModelShapes
    max_len: int = 0
    size: tuple[int, int] = (0, 0)
    unsafe: UnlearnPrompts | None = None
    safe: list[str] | None = None
    images: list[tuple[Path, str]] | None = None
    checkpoint: Path | None = None
    stats_sources: dict[str, Path | None] | None = None  # the verified statistics each set continues from
    num_processes: int = 1  # processes this launch runs (part of a training checkpoint's fingerprint)
    notes: list[str] = field(default_factory=list)  # damaged files skipped (logged once the run's log is open)
    held: dict[str, list[str]] = field(default_factory=dict)  # held-out unsafe/safe prompts (trainer.stages.calibrate)
    held_out: bool = False  # whether `held` was kept out of collect/train (else: the training prompts)

    @property
    def stages(self) -> tuple[str, ...]:
        return STAGES[self.command]


def _stats_shapes(run: RunDir):
    """:class:`saferope_engine.ModelShapes` from the statistics files, after checking that both are whole."""
    from saferope_engine import ModelShapes

    from .select import stats_blocks

    shapes = None
    for name in SETS:
        path = run.stats_file(name)
        if not path.is_file():
            raise UsageError(f"{path}: no statistics in {str(run.root)!r} (run `collect` first)")
        try:
            meta = stats_metadata(path)
            kv = int(meta["num_kv_heads"]) if "num_kv_heads" in meta else None
            shapes = ModelShapes(arch=meta.get("arch", "flux1"), num_heads=int(meta["num_heads"]),
                                 head_dim=int(meta["head_dim"]), blocks=stats_blocks(meta), num_kv_heads=kv)
        except DamagedFileError as e:
            raise UsageError(f"{e}; `collect --resume latest` falls back to the previous save if there is one") from None
        except (KeyError, ValueError) as e:
            raise UsageError(f"{path}: not a statistics file of this trainer (metadata {e})") from None
    return shapes


def _describe(shapes) -> str:
    blocks = " + ".join(f"{n} {kind}" for kind, n in shapes.blocks.items())
    return f"{shapes.arch}: {shapes.num_heads} heads × {shapes.head_dim}, {blocks} blocks"


def _check_kinds(cfg: RunConfig, shapes) -> None:
    """``select.kinds`` must name at least one block kind of the model; ``train.segments`` only its kinds and the
    segments they see."""
    from saferope_engine import arch

    family = arch.get(shapes.arch)
    if not any(k in shapes.blocks for k in cfg.select.kinds):
        raise UsageError(f"config key 'select.kinds' {cfg.select.kinds} names no block kind of {family.label()} "
                         f"(its kinds: {', '.join(shapes.blocks)})")
    for kind, segs in cfg.train.segments.items():
        if kind not in shapes.blocks:
            raise UsageError(f"config key 'train.segments.{kind}': {family.label()} has no {kind!r} blocks "
                             f"(its kinds: {', '.join(shapes.blocks)})")
        unseen = [s for s in segs if s not in family.kind(kind).segments]
        if unseen:
            raise UsageError(f"config key 'train.segments.{kind}': {kind} blocks never see {', '.join(unseen)} tokens "
                             f"(they see {', '.join(family.kind(kind).segments)})")


def preflight(command: str, cfg: RunConfig, run: RunDir, resume: str | None) -> Plan:
    """Check every input; raises UsageError (nothing has been written yet)."""
    from .train import changed_settings, pick_checkpoint, train_fingerprint

    plan = Plan(command, cfg, run, resume, num_processes=launched_processes()[1])
    stages = plan.stages
    if resume and resume != "latest" and not Path(resume).is_dir():
        raise UsageError(f"--resume {resume!r}: expected `latest` or a checkpoint folder")
    check_output_dir(run.root)
    if command == "build" and run.has_run() and not resume:
        raise UsageError(f"{str(run.root)!r} already holds a run; add --resume latest to continue it or choose another --out")
    # What the training objectives read (trainer.stages.objectives), when this command trains.
    needs = objectives.needs(cfg.train.unlearn, cfg.train.preserve) if "train" in stages else set()
    # Prompt files first (cheap, and the most common mistake).
    if "collect" in stages or "train" in stages:  # training calibrates τ and checks itself on held-out prompts
        plan.unsafe = read_unlearn(cfg.prompts.unsafe, cfg.prompts.anchors or None, need_anchors="anchors" in needs)
        plan.safe = read_prompts(cfg.prompts.safe, what="safe prompts")
        _hold_out(plan)
    if "images" in needs:
        from ..core.images import list_images

        plan.images = list_images(cfg.train.images)
    # Model and shapes.
    if "collect" in stages or "train" in stages:
        plan.info = resolve_model(cfg.model)
        plan.shapes = plan.info.shapes
        plan.max_len = max_sequence_length(plan.info, cfg.max_sequence_length)
        plan.size = image_size(plan.info, cfg.height, cfg.width)
    else:
        plan.shapes = _stats_shapes(run)
    _check_kinds(cfg, plan.shapes)
    D = plan.shapes.head_dim
    if cfg.select.rank > D:
        raise UsageError(f"rank {cfg.select.rank} is larger than the model's head_dim {D}")
    if cfg.select.rank < 1:
        raise UsageError(f"rank must be ≥ 1, got {cfg.select.rank}")
    # Run-directory state.
    if "collect" in stages:
        existing = [p for name in SETS for p in (run.stats_file(name), run.previous_stats_file(name)) if p.exists()]
        if existing and not resume:
            raise UsageError(f"{str(run.root)!r} already has statistics; add --resume latest to continue them "
                             "or choose another --out")
        plan.stats_sources, notes = pick_stats(cfg, run)
        plan.notes += notes
    elif "select" in stages or "train" in stages:
        stats = _stats_shapes(run)
        if plan.info is not None and stats != plan.shapes:
            raise UsageError(f"the statistics in {str(run.root)!r} are of another model ({_describe(stats)}) than "
                             f"MODEL {cfg.model!r} ({_describe(plan.shapes)})")
    if "train" in stages:
        if "select" not in stages and not run.selection_file().is_file():
            raise UsageError(f"{run.selection_file()}: no head selection (run `select` first)")
        ckpts = run.checkpoint_dirs()
        if (ckpts or run.adapter.is_file()) and not resume:
            raise UsageError(f"{str(run.root)!r} already has training checkpoints or an adapter; add --resume latest "
                             "to continue, or choose another --out")
        plan.checkpoint, notes = pick_checkpoint(run, resume)
        plan.notes += notes
        if plan.checkpoint is not None:
            old = json.loads((plan.checkpoint / "state.json").read_text(encoding="utf-8"))["fingerprint"]
            changed = changed_settings(old, train_fingerprint(cfg, plan.num_processes))
            if changed:
                raise UsageError(f"cannot resume from {str(plan.checkpoint)!r}: settings changed ({', '.join(changed)})")
    return plan


def _hold_out(plan: Plan) -> None:
    """Keep a seeded share of each prompt set out of collect/train (``calibrate.holdout``)."""
    from .calibrate import split_holdout

    c, seed = plan.cfg.calibrate, plan.cfg.seed
    fit_u, held_u = split_holdout(len(plan.unsafe.prompts), c.holdout, seed, c.min_prompts)
    fit_s, held_s = split_holdout(len(plan.safe), c.holdout, seed + 1, c.min_prompts)
    plan.held_out = bool(held_u and held_s)
    if not plan.held_out:  # too few prompts to split: calibrate and check on the training prompts
        plan.held = {"unsafe": list(plan.unsafe.prompts), "safe": list(plan.safe)}
        return
    u = plan.unsafe
    plan.held = {"unsafe": [u.prompts[i] for i in held_u], "safe": [plan.safe[i] for i in held_s]}
    plan.unsafe = type(u)([u.prompts[i] for i in fit_u], None if u.anchors is None else [u.anchors[i] for i in fit_u])
    plan.safe = [plan.safe[i] for i in fit_s]


def _file_logging(run: RunDir, command: str, runtime) -> logging.Handler:
    """The run's log file: ``logs/<command>.log`` from the main process; each other process writes its
    warnings and errors to ``logs/<command>.rank-N.log`` (created only if it has any)."""
    run.logs.mkdir(parents=True, exist_ok=True)
    if runtime.is_main:
        handler = logging.FileHandler(run.logs / f"{command}.log", encoding="utf-8")
        handler.setLevel(logging.DEBUG)
    else:
        handler = logging.FileHandler(run.logs / f"{command}.rank-{runtime.process_index}.log", encoding="utf-8",
                                      delay=True)
        handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def execute(plan: Plan, report: bool = True) -> None:
    """Run the planned stages (the run directory is created here, after every check passed).

    ``report`` prints the run's paths at the end (the CLI commands; the demo prints its own).
    """
    import torch

    from ..core.runtime import make_runtime
    from ..families.models import load_transformer, torch_dtype

    cfg, run = plan.cfg, plan.run
    runtime = make_runtime(cfg.device, cfg.mixed_precision)
    if runtime.num_processes != plan.num_processes:
        raise UsageError(f"{runtime.num_processes} processes joined, {plan.num_processes} were launched")
    runtime.barrier()  # every process has finished its checks before the main one writes
    if runtime.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        run.write_config(cfg)
    runtime.barrier()
    handler = _file_logging(run, plan.command, runtime)
    transformer = caller = tables = None
    try:
        logger.info("%s: run directory %s (device %s, %d process(es))", plan.command, run.root, runtime.device,
                    runtime.num_processes)
        for note in plan.notes if runtime.is_main else []:
            logger.warning("%s", note)
        if plan.info is not None:
            from ..families.models import family_of
            from ..families.text import encode_sets

            # Text first, then the text encoders are freed: they and the transformer are never loaded together.
            tables = encode_sets(plan.info, _prompt_sets(plan), max_len=plan.max_len, dtype=cfg.dtype,
                                 runtime=runtime, cache_dir=run.cache)
            transformer = load_transformer(plan.info, cfg.dtype, runtime.device)
            caller = family_of(plan.info).caller(transformer, plan.info, plan.size[0], plan.size[1], cfg.guidance,
                                                 runtime.device, torch_dtype(cfg.dtype))
        if "collect" in plan.stages:
            from .collect import run_collect

            metrics = run_collect(cfg, plan.info, runtime, tables, transformer, caller, run, plan.stats_sources)
            if runtime.is_main:
                run.update_metrics("collect", metrics)
        if "select" in plan.stages and runtime.is_main:
            from .select import run_select

            _, metrics = run_select(cfg, run)
            run.update_metrics("select", metrics)
        runtime.barrier()
        if "train" in plan.stages:
            _train(plan, runtime, transformer, caller, tables)
        if runtime.is_main and report:
            _report(plan)
    except BaseException:
        # The traceback goes to the run's log file only; the console gets one line from the CLI.
        handler.handle(logging.LogRecord("trainer", logging.ERROR, __file__, 0, "%s failed", (plan.command,),
                                         sys.exc_info()))
        raise
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        del transformer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _needs(plan: Plan) -> set[str]:
    """What the command's training objectives read (empty when it does not train)."""
    return objectives.needs(plan.cfg.train.unlearn, plan.cfg.train.preserve) if "train" in plan.stages else set()


def _prompt_sets(plan: Plan) -> dict[str, list[str]]:
    sets: dict[str, list[str]] = {}
    if plan.unsafe is not None:
        sets["unsafe"] = plan.unsafe.prompts
        if "anchors" in _needs(plan) and plan.unsafe.anchors is not None:
            sets["anchors"] = plan.unsafe.anchors
    if plan.safe is not None:
        sets["safe"] = plan.safe
    if plan.images is not None:
        sets["captions"] = [c for _, c in plan.images]
    if "train" in plan.stages and plan.held:
        sets.update({f"held_{k}": v for k, v in plan.held.items()})
    return sets


def _train(plan: Plan, runtime, transformer, caller, tables) -> None:
    from .select import read_selection
    from .train import TrainData, Trainer, initial_adapter, raise_untrained, train_fingerprint, with_metrics, with_threshold

    cfg, run = plan.cfg, plan.run
    base_model = cfg.base_model or plan.info.name
    selection = read_selection(run)
    adapter = initial_adapter(cfg, run, selection, plan.shapes, base_model)
    calibration = _calibrate(plan, caller, tables, adapter)  # deterministic: every process gets the same τ
    adapter = with_threshold(adapter, calibration["threshold"])
    needs = _needs(plan)
    data = TrainData(unsafe=tables.get("unsafe") if "unsafe" in needs else None,
                     anchors=tables.get("anchors"), safe=tables.get("safe") if "safe" in needs else None,
                     captions=tables.get("captions"))
    if "images" in needs:
        from ..families.latents import encode_images

        data.image_latents = encode_images(plan.info, plan.images, height=plan.size[0], width=plan.size[1],
                                           dtype=cfg.dtype, runtime=runtime, cache_dir=run.cache)
    trainer = Trainer(cfg, run, runtime, transformer, caller, adapter, data,
                      train_fingerprint(cfg, runtime.num_processes))
    try:
        if plan.checkpoint is not None:
            trainer.load_checkpoint(plan.checkpoint)
        metrics = trainer.fit()
    finally:
        trainer.close()
    if runtime.is_main:
        from .calibrate import raise_failed

        metrics["calibration"] = calibration
        cfg_json = jsonable(cfg.to_dict())
        final = trainer.export(cfg_json, metrics)
        if cfg.calibrate.check:
            metrics["self_check"] = check = _self_check(plan, caller, tables, final, calibration)
            if not check["passed"]:
                run.update_metrics("train", metrics)  # the figures stay readable; no adapter file is written
                raise_failed(check)
            final = with_metrics(final, cfg_json, metrics)
        raise_untrained(final)
        final.save(run.adapter)
        metrics["adapter"] = str(run.adapter)
        metrics["adapter_parameters"] = final.num_parameters()
        run.update_metrics("train", metrics)


def _held_batches(plan: Plan, caller, tables, name: str) -> list:
    table = tables[f"held_{name}"]
    bs = plan.cfg.collect.batch_size
    return [table.rows(list(range(i, min(i + bs, len(table))))).to(caller.device, caller.dtype)
            for i in range(0, len(table), bs)]


def _calibrate(plan: Plan, caller, tables, adapter) -> dict[str, Any]:
    """τ: ``train.threshold`` when given, else calibrated on the held-out prompts (trainer.stages.calibrate)."""
    from .calibrate import choose_threshold, risk_profile, separation

    cfg = plan.cfg
    profiles = {name: risk_profile(caller, caller.transformer, adapter, _held_batches(plan, caller, tables, name),
                                   cfg.collect.sigmas, cfg.seed, apply=False) for name in ("unsafe", "safe")}
    if math.isnan(cfg.train.threshold):
        info = choose_threshold(profiles["unsafe"], profiles["safe"], safe_share=cfg.calibrate.safe_share,
                                margin=cfg.calibrate.margin)
    else:
        info = {"method": "given (train.threshold)", "threshold": cfg.train.threshold,
                **separation(profiles["unsafe"], profiles["safe"], cfg.train.threshold)}
    info["held_out"] = plan.held_out
    logger.info("threshold τ = %.4g (%s): held-out unsafe prompts gated %.0f%%, safe %.0f%% (base-model risks; "
                "%s)", info["threshold"], info["method"], 100 * info["unsafe_gated_share"],
                100 * info["safe_gated_share"], "held-out prompts" if plan.held_out else
                "too few prompts to hold some out: the training prompts")
    return info


def _self_check(plan: Plan, caller, tables, adapter, calibration: dict[str, Any]) -> dict[str, Any]:
    from .calibrate import risk_profile, self_check

    cfg = plan.cfg
    profiles = {name: risk_profile(caller, caller.transformer, adapter, _held_batches(plan, caller, tables, name),
                                   cfg.collect.sigmas, cfg.seed + 1, apply=True) for name in ("unsafe", "safe")}
    report = self_check(profiles["unsafe"], profiles["safe"], tau=calibration["threshold"],
                        method=calibration["method"], min_unsafe=cfg.calibrate.min_unsafe, held_out=plan.held_out)
    report["held_out"] = plan.held_out
    logger.info("self-check: the adapter gates %.0f%% of %d held-out unsafe prompts and %.0f%% of %d safe ones",
                100 * report["unsafe_gated_share"], report["unsafe_prompts"], 100 * report["safe_gated_share"],
                report["safe_prompts"])
    return report


def _report(plan: Plan) -> None:
    run = plan.run
    lines = [f"run directory: {run.root}"]
    if "collect" in plan.stages:
        lines.append(f"statistics:    {run.stats}")
    if "select" in plan.stages:
        lines.append(f"head scores:   {run.select / 'scores.png'} ({run.select / 'heads.md'})")
    if "train" in plan.stages:
        lines.append(f"adapter:       {run.adapter}")
        if plan.cfg.recipe and plan.info is not None:
            from ..recipes import adapter_filename, load_recipe

            name = adapter_filename(load_recipe(plan.cfg.recipe).name, plan.cfg.base_model or plan.info.name)
            lines.append(f"for ComfyUI:   cp {run.adapter} ComfyUI/models/saferope/{name}")
    lines.append(f"metrics:       {run.metrics}")
    print("\n".join(lines))
