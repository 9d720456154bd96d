"""Attack benchmarks of ``trainer evaluate --attack-budget N``, by extension (:mod:`trainer.extensions`).

An attack benchmark needs a judge of the concept in an image, so it belongs to whoever has one: the
toy world registers its own (:mod:`trainer.toy.attacks`: black-box prompt search and white-box
embedding PGD, judged by its pixel classifier). A runner is ``run(cfg, adapter_paths, budget) ->
markdown lines`` that writes its files under ``OUT/evaluate/``; ``applies(model_path)`` says whether
it can attack that model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UsageError


@dataclass(frozen=True)
class AttackBenchmark:
    name: str
    applies: Callable[[Path], bool]
    run: Callable[..., None]


_REGISTRY: dict[str, AttackBenchmark] = {}


def register_attack(name: str, applies: Callable[[Path], bool], run: Callable[..., None]) -> None:
    """Add (or replace) an attack benchmark."""
    _REGISTRY[name] = AttackBenchmark(name, applies, run)


def attack_for(model_path: Path) -> AttackBenchmark:
    """The registered benchmark that can attack the model at ``model_path``; :class:`UsageError` when none can."""
    from ..extensions import load_extensions

    load_extensions()
    for bench in _REGISTRY.values():
        if bench.applies(model_path):
            return bench
    names = ", ".join(sorted(_REGISTRY)) or "none"
    raise UsageError(f"--attack-budget: no attack benchmark can judge images of {str(model_path)!r} "
                     f"(registered: {names}; the toy world's needs a toy-world model)")
