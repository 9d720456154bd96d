"""Images with adapters applied exactly as the nodes apply them (``generate`` and ``evaluate``).

The model's pipeline runs normally; each adapter is applied with
:func:`saferope_engine.diffusers.apply_saferope` (stacked in the given order, each with its own
strength). Latent noise comes from CPU generators seeded per image, so an image is the same on
any device for the same seed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch

from saferope_engine import SafeRoPEAdapter, load_adapter

from ..core.errors import UsageError
from ..families.models import ModelInfo


def load_adapters(paths: Sequence[str], info: ModelInfo) -> list[SafeRoPEAdapter]:
    """Load and check each adapter against the model's shapes (before any model is loaded); an adapter of
    another model (family, heads or blocks) is bad input: a :class:`UsageError` naming both."""
    from saferope_engine.errors import IncompatibleAdapterError

    adapters = []
    for path in paths:
        adapter = load_adapter(path)
        try:
            adapter.check_compatible(info.shapes)
        except IncompatibleAdapterError as e:
            raise UsageError(f"{e} (MODEL {info.spec!r} is {arch_label(info.family)})") from None
        adapters.append(adapter)
    return adapters


def arch_label(family: str) -> str:
    from saferope_engine import arch

    return arch.get(family).label()


def check_strengths(given: Sequence[float] | None) -> None:
    """Every ``--strength`` must be a finite number ≥ 0."""
    if given and any(not (math.isfinite(s) and s >= 0) for s in given):
        raise UsageError(f"--strength must be a finite number ≥ 0, got {', '.join(map(str, given))}")


def strengths_for(adapters: Sequence[SafeRoPEAdapter], given: Sequence[float] | None) -> list[float]:
    check_strengths(given)
    if not given:
        return [1.0] * len(adapters)
    if len(given) == 1:
        return [given[0]] * len(adapters)
    if len(given) != len(adapters):
        raise UsageError(f"{len(given)} --strength values for {len(adapters)} adapters (give one, or one per adapter)")
    return list(given)


@contextlib.contextmanager
def applied(transformer, adapters: Sequence[SafeRoPEAdapter], strengths: Sequence[float], threshold: float | None):
    """Apply adapters in order; remove them in reverse order on exit."""
    from saferope_engine.diffusers import apply_saferope

    handles = []
    try:
        for adapter, s in zip(adapters, strengths):
            handles.append(apply_saferope(transformer, adapter, strength=s, threshold=threshold))
        yield handles
    finally:
        for h in reversed(handles):
            h.remove()


def generate_images(info: ModelInfo, pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int,
                    guidance: float, height: int, width: int, max_len: int) -> list:
    """PIL images for ``prompts[i]`` with noise seed ``seeds[i]`` (CPU generators: device-independent), through
    the family's own pipeline call (:meth:`trainer.families.base.Family.generate`)."""
    from ..families.models import family_of

    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    return family_of(info).generate(pipe, prompts, gens, steps=steps, guidance=guidance, height=height, width=width,
                                    max_len=max_len)
