"""``train``: learn the generators of the selected heads (design §3.4).

Each patched block and segment gets a parameter ``W`` ``(n, r, r)``; the adapter uses
``A = W − Wᵀ`` (exactly skew; ``W = 0`` is the identity). The loss per step is
``λ_u·L_unlearn + λ_p·L_preserve``, the objectives of :mod:`trainer.stages.objectives`
(``anchor`` | ``deviate``, ``distill`` | ``flow``).

The adapter runs through :func:`saferope_engine.diffusers.apply_saferope`; base-model targets come
from the same patched transformer inside ``handle.bypassed()`` without gradients. Only ``W``
requires grad. Randomness is counter-based (a generator seeded from seed, step and process per
step), so a run resumed from a checkpoint (``W``, AdamW state, step) repeats exactly what the
uninterrupted run would have done — with the same number of processes, which is part of the
checkpoint's fingerprint. Gradients and losses are averaged across processes.

A checkpoint folder holds ``state.safetensors``, ``state.json`` and, written last,
``manifest.json`` (their sizes and SHA-256). :func:`verify_checkpoint` checks all three and the
contents (finite tensors, generators within :data:`MAX_GENERATOR_NORM`) before a resume trusts
one; ``--resume latest`` falls back to the newest intact checkpoint and says which it skipped.
The generators are also checked after initialisation and after every optimizer step.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saferope_engine import BlockAdapter, SafeRoPEAdapter
from saferope_engine import adapter as adapter_format
from saferope_engine.subspace import GramAccumulator, assemble_adapter

from ..core.config import RunConfig, diff_fingerprints, fingerprint, init_std, jsonable, rollout_grid
from ..core.errors import TrainerError, UsageError
from ..core.progress import progress_bar
from ..core.rundir import DamagedFileError, RunDir, atomic_write_json, check_manifest, commit_dir, write_manifest
from ..core.runtime import Runtime
from ..families.base import Caller
from ..families.text import EmbeddingTable, TextBatch
from .collect import COLLECT_KEYS, step_seed
from .objectives import NONE, OBJECTIVES, ROLES

logger = logging.getLogger(__name__)

#: Config keys that must not change when a training run is resumed.
TRAIN_KEYS = COLLECT_KEYS + ["prompts.anchors", "select", "mixed_precision", "concepts", "calibrate"] + [
    f"train.{k}" for k in ("batch_size", "lr", "weight_decay", "unlearn", "preserve", "lambda_unlearn",
                           "lambda_preserve", "threshold", "double_segments", "single_segments", "segments", "init_std",
                           "unlearn_sigmas", "preserve_sigmas", "latents", "rollout_steps", "images")]

#: Largest Frobenius norm ‖A‖_F = ‖W − Wᵀ‖_F of one head's generator that a run accepts (after
#: initialisation, after every optimizer step, in a checkpoint): the adapter format's own bound
#: (a file with a larger generator would be refused). A learned generator stays far below it
#: (`trainer demo --quick`, 60 steps at lr 0.05: at most 7.9).
MAX_GENERATOR_NORM = adapter_format.MAX_GENERATOR_NORM

CHECKPOINT_FILES = ("state.safetensors", "state.json")


def train_fingerprint(cfg: RunConfig, num_processes: int) -> dict[str, Any]:
    """What a checkpoint must have been trained with to be resumed: the training keys and the process count
    (each process draws its own samples, so another count gives another run)."""
    return {**fingerprint(cfg, TRAIN_KEYS), "num_processes": num_processes}


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ (``num_processes`` with both values; checkpoints from before it was
    recorded are not compared on it)."""
    if "num_processes" not in old:
        new = {k: v for k, v in new.items() if k != "num_processes"}
    out = []
    for key in diff_fingerprints(old, new):
        out.append(f"num_processes {old.get(key)} → {new.get(key)}" if key == "num_processes" else key)
    return out


def check_generators(named: dict[str, Tensor], where: str, cause: str) -> None:
    """Raise :class:`TrainerError` naming ``where`` (a step, a file) if any ``W`` is non-finite or a head's
    ``‖W − Wᵀ‖_F`` exceeds :data:`MAX_GENERATOR_NORM`; ``cause`` says what likely made it so."""
    for name, W in named.items():
        W = W.detach()
        if not bool(torch.isfinite(W).all()):
            raise TrainerError(f"{where}: generator {name} has non-finite entries ({cause})")
        norms = torch.linalg.matrix_norm((W - W.transpose(-1, -2)).double())  # (n,) per head
        if norms.numel() and float(norms.max()) > MAX_GENERATOR_NORM:
            head = int(norms.argmax())
            raise TrainerError(f"{where}: generator {name} head {head} has ‖A‖_F = {float(norms.max()):.4g} > "
                               f"{MAX_GENERATOR_NORM:g} ({cause})")


def verify_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read and check a checkpoint folder; returns ``(state.json, tensors)``.

    Checks the manifest (sizes and SHA-256; older checkpoints have none), that ``state.json`` and
    ``state.safetensors`` parse completely and agree (a ``W`` per listed generator, finite tensors,
    AdamW entries), and that the generators are within :data:`MAX_GENERATOR_NORM`. Raises
    :class:`DamagedFileError` naming the file.
    """
    from safetensors.torch import load_file

    check_manifest(path)
    state_file, tensor_file = path / "state.json", path / "state.safetensors"
    for f in (state_file, tensor_file):
        if not f.is_file():
            raise DamagedFileError(f"{f}: missing")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        step, params, groups = state["step"], state["params"], state["param_groups"]
        if not (isinstance(step, int) and step >= 0 and isinstance(state["fingerprint"], dict)
                and isinstance(params, list) and all(isinstance(n, str) for n in params)
                and isinstance(groups, list) and groups and all(isinstance(g, dict) for g in groups)):
            raise ValueError("unexpected types of step/fingerprint/params/param_groups")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise DamagedFileError(f"{state_file}: unreadable checkpoint state ({type(e).__name__}: {e})") from None
    try:
        tensors = load_file(str(tensor_file))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise DamagedFileError(f"{tensor_file}: unreadable ({type(e).__name__}: {e})") from None
    missing = [n for n in params if f"W.{n}" not in tensors]
    if missing:
        raise DamagedFileError(f"{tensor_file}: no generator W for {missing}")
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DamagedFileError(f"{tensor_file}: tensor {name!r} has non-finite entries")
    try:
        check_generators({n: tensors[f"W.{n}"] for n in params}, str(tensor_file), "a damaged or foreign checkpoint")
    except TrainerError as e:
        raise DamagedFileError(str(e)) from None
    return state, tensors


def pick_checkpoint(run: RunDir, resume: str | None) -> tuple[Path | None, list[str]]:
    """The checkpoint a resume starts from, and notes on the damaged ones it skipped.

    ``latest``: the newest intact checkpoint (``None`` when there is none yet); a path: that one,
    which must be intact. Nothing intact among existing checkpoints is a :class:`UsageError` naming
    the newest damaged file.
    """
    if not resume:
        return None, []
    if resume != "latest":
        path = Path(resume)
        try:
            verify_checkpoint(path)
        except DamagedFileError as e:
            raise UsageError(f"--resume {resume!r}: damaged checkpoint ({e})") from None
        return path, []
    notes: list[str] = []
    ckpts = run.checkpoint_dirs()
    for path in reversed(ckpts):
        try:
            verify_checkpoint(path)
        except DamagedFileError as e:
            notes.append(f"skipping damaged checkpoint {path.name}: {e}")
            continue
        if notes:
            notes.append(f"resuming from {path.name}, the newest intact checkpoint")
        return path, notes
    if ckpts:
        raise UsageError(f"no intact checkpoint to resume from in {run.checkpoints} "
                         f"({notes[0].removeprefix('skipping damaged checkpoint ')}"
                         f"{f'; {len(ckpts) - 1} older damaged too' if len(ckpts) > 1 else ''}); "
                         "remove the checkpoints folder to train afresh")
    return None, notes


@dataclass
class TrainData:
    """Encoded prompt sets used by the objectives (``None`` when an objective is off)."""

    unsafe: EmbeddingTable | None = None
    anchors: EmbeddingTable | None = None
    safe: EmbeddingTable | None = None
    captions: EmbeddingTable | None = None
    image_latents: Tensor | None = None  # (N, c, h, w) for the flow objective


def initial_adapter(cfg: RunConfig, run: RunDir, selection: dict[tuple[str, int], list[int]],
                    shapes, base_model: str) -> SafeRoPEAdapter:
    """The adapter with zero generators (identity) from the statistics and the selection.

    Bases follow ``select.basis``: ``contrast`` (default) needs the safe statistics too. τ is
    ``train.threshold`` (a placeholder when that is NaN: calibration sets it, :func:`with_threshold`).
    """
    tau = cfg.train.threshold
    if math.isnan(tau):
        tau = 0.5  # placeholder of an adapter whose τ is calibrated next (trainer.stages.calibrate, with_threshold)
    unsafe = GramAccumulator.load(run.stats_file("unsafe"))
    safe = GramAccumulator.load(run.stats_file("safe")) if cfg.select.basis == "contrast" else None
    segs = generator_segments(cfg, shapes)
    heads = {key: hs for key, hs in selection.items() if segs.get(key[0])}
    if not heads:
        raise TrainerError("the selected heads lie only in block kinds without generator segments "
                           f"({', '.join(f'{k}: {v}' for k, v in segs.items())}; train.double_segments, "
                           "train.single_segments, train.segments)")
    return assemble_adapter(unsafe, heads, rank=cfg.select.rank, blocks=shapes.blocks, arch=shapes.arch, segments=segs,
                            threshold=tau, concepts=cfg.concepts, base_model=base_model,
                            basis_segment=cfg.select.segment, basis=cfg.select.basis, safe=safe,
                            contrast_weight=cfg.select.contrast_weight)


def generator_segments(cfg: RunConfig, shapes) -> dict[str, list[str]]:
    """The generator segments of each block kind of the model: ``train.segments[kind]``, else
    ``train.double_segments`` / ``train.single_segments`` for those kinds, else text when the kind sees text;
    always only segments the kind's tokens carry (:class:`saferope_engine.arch.Kind`)."""
    from saferope_engine import arch

    t = cfg.train
    out = {}
    for kind in arch.get(shapes.arch).kinds:
        if kind.name not in shapes.blocks:
            continue
        named = {"double": t.double_segments, "single": t.single_segments}
        wanted = t.segments.get(kind.name, named.get(kind.name, ["txt"]))
        out[kind.name] = [seg for seg in wanted if seg in kind.segments]
    return out


def make_generators(adapter: SafeRoPEAdapter, std: float, seed: int, device) -> dict[str, torch.nn.Parameter]:
    """One ``W`` ``(n, r, r)`` per block and segment: zeros, or N(0, std²) from ``seed``."""
    gen = torch.Generator().manual_seed(step_seed(seed, "init"))
    params = {}
    for block in adapter.blocks.values():
        for seg in ("txt", "img"):
            A = block.generator(seg)
            if A is None:
                continue
            W = torch.randn(A.shape, generator=gen) * std if std > 0 else torch.zeros(A.shape)
            params[f"{block.key}.A_{seg}"] = torch.nn.Parameter(W.to(device))
    return params


def bind(adapter: SafeRoPEAdapter, params: dict[str, torch.nn.Parameter]) -> None:
    """Point the adapter's generators at ``A = W − Wᵀ`` (recomputed every step so grads reach W)."""
    for name, W in params.items():
        kind, idx, field_name = name.split(".")
        setattr(adapter.block(kind, int(idx)), field_name, W - W.transpose(-1, -2))


def generators_of(params: dict[str, torch.nn.Parameter]) -> dict[str, Tensor]:
    return {name: (W - W.transpose(-1, -2)).detach().float().cpu() for name, W in params.items()}


class Trainer:
    """One training run over a patched transformer."""

    def __init__(self, cfg: RunConfig, run: RunDir, runtime: Runtime, transformer, caller: Caller,
                 adapter: SafeRoPEAdapter, data: TrainData, fp: dict[str, Any]) -> None:
        from saferope_engine.diffusers import apply_saferope

        self.cfg, self.t, self.run, self.runtime = cfg, cfg.train, run, runtime
        self.transformer, self.caller, self.adapter, self.data, self.fp = transformer, caller, adapter, data, fp
        if any(p.requires_grad for p in transformer.parameters()):
            raise TrainerError("internal: the backbone must be frozen (requires_grad False)")
        self.params = make_generators(adapter, init_std(self.t), cfg.seed, runtime.device)
        check_generators(self.params, "initialisation", f"train.init_std = {init_std(self.t):g} is too large")
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=self.t.lr, weight_decay=self.t.weight_decay)
        self.step = 0
        self.history: list[dict[str, float]] = []
        bind(adapter, self.params)
        self.handle = apply_saferope(transformer, adapter, strength=1.0)
        if self.t.gradient_checkpointing:
            # the family's way (diffusers' own is unfaithful for some); the engine keeps each block's text split on recompute
            self.undo_checkpointing = caller.family.enable_gradient_checkpointing(transformer)

    def close(self) -> None:
        self.handle.remove()
        if self.t.gradient_checkpointing:
            self.undo_checkpointing()

    # -- one step ------------------------------------------------------------------------------
    def sigma(self, gen: torch.Generator, rng: list[float]) -> float:
        """A noise level in ``rng``: a rollout grid point, or uniform for ``latents = \"noise\"``."""
        if self.t.latents == "rollout":
            grid = rollout_grid(self.t.rollout_steps, rng)
            return grid[int(torch.randint(len(grid), (1,), generator=gen))]
        return rng[0] + (rng[1] - rng[0]) * float(torch.rand(1, generator=gen))

    def latents(self, gen: torch.Generator, text: TextBatch, sigma: float) -> Tensor:
        """Noisy latents at ``sigma``: a base-model rollout of the target prompt, or random x₀ mixed with noise."""
        B = len(text)
        x1 = self.caller.noise(B, gen)
        if self.t.latents == "rollout":
            with self.handle.bypassed(), self.runtime.autocast():
                return self.caller.rollout(x1, text, sigma, self.t.rollout_steps)
        x0 = self.caller.noise(B, gen)
        return (1.0 - sigma) * x0 + sigma * x1

    def pair(self, x: Tensor, sigma: float, text: TextBatch, target_text: TextBatch) -> tuple[Tensor, Tensor]:
        """``(v_adapter(text), v_base(target_text))`` at the same latents and noise level."""
        s = torch.full((x.shape[0],), sigma)
        with torch.no_grad(), self.handle.bypassed(), self.runtime.autocast():
            target = self.caller.velocity(x, s, target_text)
        with self.runtime.autocast():
            pred = self.caller.velocity(x, s, text)
        return pred.float(), target.float()

    def rows(self, table: EmbeddingTable, idx: list[int]) -> TextBatch:
        """Rows ``idx`` of ``table`` on the run's device and dtype."""
        return table.rows(idx).to(self.runtime.device, self.caller.dtype)

    def draw(self, table: EmbeddingTable, gen: torch.Generator) -> list[int]:
        """A batch of row indices of ``table`` (with replacement)."""
        return torch.randint(len(table), (self.t.batch_size,), generator=gen).tolist()

    def train_step(self) -> dict[str, float]:
        """One optimisation step (each role's objective of :data:`~trainer.stages.objectives.OBJECTIVES`); its losses."""
        t = self.t
        gen = torch.Generator().manual_seed(step_seed(self.cfg.seed, "train", self.step, self.runtime.process_index))
        self.optimizer.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        total = 0.0
        for role in ROLES:
            name, weight = getattr(t, role), getattr(t, f"lambda_{role}")
            if name == NONE:
                continue
            bind(self.adapter, self.params)
            loss = OBJECTIVES[name].loss(self, gen)
            _backward(weight * loss)
            logs[role] = float(loss.detach())
            total += weight * logs[role]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params.values()]
        for p, g in zip(self.params.values(), grads):
            p.grad = g
        self.runtime.all_reduce_(grads, op="mean")
        self.optimizer.step()
        self.step += 1
        logs["loss"] = total
        if self.runtime.num_processes > 1:  # every process reports (and checks) the same mean losses
            keys = list(logs)
            values = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=self.runtime.device)
            self.runtime.all_reduce_([values], op="mean")
            logs = dict(zip(keys, values.tolist()))
        logs["grad_norm"] = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads)))
        check_generators(self.params, f"step {self.step}",
                         f"the optimizer step diverged; train.lr = {self.t.lr:g} is likely too large")
        return logs

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        from safetensors.torch import save_file

        names = list(self.params)
        tensors = {f"W.{n}": p.detach().cpu().contiguous() for n, p in self.params.items()}
        opt = self.optimizer.state_dict()
        for i, n in enumerate(names):
            for key, value in opt["state"].get(i, {}).items():
                tensors[f"adam.{n}.{key}"] = torch.as_tensor(value).detach().cpu().reshape(-1).contiguous() \
                    if key == "step" else value.detach().cpu().contiguous()
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
        state = {"step": self.step, "fingerprint": self.fp, "params": names, "param_groups": groups,
                 "rng": {"scheme": "counter", "seed": self.cfg.seed,
                         "note": "per-step generators are seeded from (seed, step, process); the step restores them"},
                 "history": self.history[-1000:]}
        tmp, final = self.run.new_checkpoint_dir(self.step)
        save_file(tensors, str(tmp / "state.safetensors"))
        atomic_write_json(tmp / "state.json", state)
        write_manifest(tmp, list(CHECKPOINT_FILES))  # last: a checkpoint is whole only with it
        commit_dir(tmp, final)
        self.run.rotate_checkpoints(self.t.keep_checkpoints)
        logger.info("checkpoint %s", final)
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Continue from a checkpoint folder (verified again here: it is read now)."""
        state, tensors = verify_checkpoint(path)
        changed = changed_settings(state["fingerprint"], self.fp)
        if changed:
            raise TrainerError(f"{path}: cannot resume, the training settings changed ({', '.join(changed)})")
        if state["params"] != list(self.params):
            raise TrainerError(f"{path}: cannot resume, the checkpoint trains other blocks ({state['params']})")
        for n, p in self.params.items():
            if tuple(tensors[f"W.{n}"].shape) != tuple(p.shape):
                raise TrainerError(f"{path}: generator {n} has shape {tuple(tensors[f'W.{n}'].shape)}, "
                                   f"this run's is {tuple(p.shape)}")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(tensors[f"W.{n}"].to(p.device, p.dtype))
        opt_state: dict[str, Any] = {"state": {}, "param_groups": []}
        for i, n in enumerate(self.params):
            entry = {key.split(".")[-1]: t for key, t in tensors.items() if key.startswith(f"adam.{n}.")}
            if entry:
                if "step" in entry:
                    entry["step"] = entry["step"].reshape(())
                opt_state["state"][i] = entry
        groups = state["param_groups"]
        for g in groups:
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])
        groups[0]["params"] = list(range(len(self.params)))
        opt_state["param_groups"] = groups
        self.optimizer.load_state_dict(opt_state)
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        logger.info("resumed from %s (step %d)", path, self.step)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
        t = self.t
        bar = progress_bar(total=t.steps, initial=self.step, desc="train", enabled=self.runtime.is_main)
        start_time, start_step = time.perf_counter(), self.step
        while self.step < t.steps:
            logs = self.train_step()
            if not all(math.isfinite(v) for v in logs.values()):
                raise TrainerError(f"training diverged at step {self.step} ({logs}); lower train.lr")
            self.history.append({"step": self.step, **{k: round(v, 6) for k, v in logs.items()}})
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4g}",
                            **{k: f"{v:.3g}" for k, v in logs.items() if k in ("unlearn", "preserve")})
            if self.step % t.log_every == 0 or self.step == t.steps:
                logger.info("step %d/%d %s", self.step, t.steps, " ".join(f"{k}={v:.5g}" for k, v in logs.items()))
            if self.runtime.is_main and (self.step % t.checkpoint_every == 0 or self.step == t.steps):
                self.save_checkpoint()
            self.runtime.barrier()
            if on_step is not None:
                on_step(self.step)
        bar.close()
        elapsed = time.perf_counter() - start_time
        last = self.history[-min(len(self.history), t.log_every):] if self.history else []
        mean = {k: sum(h[k] for h in last) / len(last) for k in (last[0] if last else {}) if k != "step"}
        return {"steps": self.step, "steps_this_run": self.step - start_step, "seconds_this_run": round(elapsed, 3),
                "steps_per_second": round((self.step - start_step) / elapsed, 4) if elapsed > 0 else None,
                "final": mean, "parameters": sum(p.numel() for p in self.params.values())}

    def export(self, cfg_json: dict[str, Any], metrics: dict[str, Any]) -> SafeRoPEAdapter:
        """The trained adapter (validated): the initial bases and heads, the trained generators, and the
        resolved config and metrics in its metadata. ``metrics`` gains ``untrained_generators`` (below)."""
        gens = generators_of(self.params)
        # A generator still exactly zero never had a gradient: no token of its segment reached τ in any
        # training step. It would rotate nothing (and the file format refuses it), so it is left out and
        # named in the metrics. When none trained they all stay, so that the self-check can report its
        # figures; :func:`raise_untrained` then refuses the file.
        untrained = sorted(k for k, A in gens.items() if not bool(A.any()))
        if untrained:
            metrics["untrained_generators"] = untrained
            if len(untrained) < len(gens):
                logger.warning("left out of the adapter (no token of their segment reached τ during training): %s",
                               ", ".join(untrained))
                gens = {k: A for k, A in gens.items() if k not in untrained}
        blocks = [BlockAdapter(b.kind, b.index, b.heads, b.U_q, b.U_k, gens.get(f"{b.key}.A_txt"),
                               gens.get(f"{b.key}.A_img")) for b in self.adapter.blocks.values()
                  if f"{b.key}.A_txt" in gens or f"{b.key}.A_img" in gens]
        return with_metrics(SafeRoPEAdapter(self.adapter.meta, blocks), cfg_json, metrics)


def with_metrics(adapter: SafeRoPEAdapter, cfg_json: dict[str, Any], metrics: dict[str, Any]) -> SafeRoPEAdapter:
    """``adapter`` with the trainer's metadata (builder, version, resolved config, metrics) as its config."""
    config = jsonable({"builder": "saferope trainer", "version": _version(), "config": cfg_json, "metrics": metrics})
    return SafeRoPEAdapter(replace(adapter.meta, config=config), list(adapter.blocks.values()))


def with_threshold(adapter: SafeRoPEAdapter, tau: float) -> SafeRoPEAdapter:
    """``adapter`` with τ = ``tau`` (the same blocks: the calibrated τ on the initial adapter)."""
    return SafeRoPEAdapter(replace(adapter.meta, threshold=float(tau)), list(adapter.blocks.values()))


def raise_untrained(adapter: SafeRoPEAdapter) -> None:
    """Refuse an exported adapter none of whose generators trained (``Trainer.export`` keeps them then)."""
    metrics = (adapter.meta.config or {}).get("metrics", {})
    untrained = metrics.get("untrained_generators", [])
    gens = [f"{b.key}.A_{seg}" for b in adapter.blocks.values() for seg in ("txt", "img") if b.generator(seg) is not None]
    if untrained and set(gens) <= set(untrained):
        raise TrainerError(
            f"no generator was trained: no token of a segment with a generator reached τ = "
            f"{adapter.meta.threshold:.3g} in any training step ({', '.join(untrained[:8])}"
            f"{' …' if len(untrained) > 8 else ''}); lower train.threshold or leave it unset (calibrated)")


def _backward(loss: Tensor) -> None:
    """Backpropagate unless no token was gated (then the loss does not depend on the generators)."""
    if loss.requires_grad:
        loss.backward()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("comfyui-saferope")
    except Exception:
        import saferope_engine

        return saferope_engine.__version__


