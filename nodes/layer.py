"""One application of an adapter to a model: what one "Apply SafeRoPE to Model" node asks for.

A :class:`SafeRoPELayer` is immutable (settings only). Everything that changes during sampling
lives in a per-call :class:`~.patch.CallRecord`, so clones that share a layer (ComfyUI copies
``model_options`` only shallowly from 0.13 on, deeply before) never share mutable state, and a
deep copy may return the very same object.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from ..saferope_engine import SafeRoPEAdapter
from ..saferope_engine.errors import SafeRoPEError

if TYPE_CHECKING:  # pragma: no cover
    from .compat import ComfyModel
    from .patch import CallRecord

#: How the layer reaches the pre-RoPE q/k: ComfyUI's attn1_patch, or object patches of QK-norms.
MODES = ("attn1", "object")


def site_name(kind: str, index: int, path: str | None = None) -> str:
    """The name of a hook site: a block (attn1_patch) or one QK-norm module of it (object patch)."""
    return f"{kind}.{index}" if path is None else f"{kind}.{index}:{path}"


@dataclass(frozen=True, eq=False)
class SafeRoPELayer:
    """An adapter plus its runtime knobs and the sampling range where it acts.

    Attributes:
        model: the recognised model (family, shapes, hook sites) the layer was applied to.
        strength: ``α`` (0 = off, 1 = as trained).
        threshold: overrides the adapter's ``τ``; ``None`` keeps the adapter's own.
        start_percent, end_percent: the sampling range (0 = first step, 1 = last).
        sigma_start, sigma_end: the same range in sigmas; the layer acts when
            ``sigma_end ≤ σ ≤ sigma_start`` for any row of the model call.
        mode: ``"attn1"`` or ``"object"`` (see :mod:`.patch`).
        token: identifies this layer's per-call record.
    """

    adapter: SafeRoPEAdapter
    model: ComfyModel
    strength: float = 1.0
    threshold: float | None = None
    start_percent: float = 0.0
    end_percent: float = 1.0
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    mode: str = "attn1"
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.strength) and self.strength >= 0.0):
            raise ValueError(f"strength must be a finite number ≥ 0, got {self.strength!r}")
        if self.threshold is not None and not (0.0 <= self.threshold < 1.0):
            raise ValueError(f"threshold must be in [0, 1) (or unset for the adapter's own), got {self.threshold!r}")
        if not (0.0 <= self.start_percent <= self.end_percent <= 1.0):
            raise ValueError(f"need 0 ≤ start_percent ≤ end_percent ≤ 1, got {self.start_percent}, {self.end_percent}")
        if self.sigma_end > self.sigma_start:
            raise ValueError(f"sigma_end {self.sigma_end} exceeds sigma_start {self.sigma_start}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        object.__setattr__(self, "_sites", self._hook_sites())  # fixed by adapter and mode; read every model call

    def __deepcopy__(self, memo: dict) -> SafeRoPELayer:
        return self  # immutable; a copy would only duplicate the adapter's tensors and device caches

    # -- identity --------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """Short human name: the adapter's file name, or its concepts."""
        if self.adapter.source:
            return os.path.basename(self.adapter.source)
        return "adapter[" + ",".join(self.adapter.meta.concepts) + "]"

    @property
    def tau(self) -> float:
        """The threshold in effect."""
        return self.adapter.meta.threshold if self.threshold is None else self.threshold

    def patches(self, kind: str, index: int) -> bool:
        """Whether the adapter has parameters for block ``(kind, index)``."""
        return (kind, index) in self.adapter.blocks

    def sites(self) -> frozenset[str]:
        """Hook sites that must run in every model call where the layer is active."""
        return self._sites  # type: ignore[attr-defined]

    def _hook_sites(self) -> frozenset[str]:
        if self.mode == "attn1":
            return frozenset(site_name(kind, idx) for kind, idx in self.adapter.block_keys())
        return frozenset(site_name(kind, idx, n.path) for kind, idx in self.adapter.block_keys()
                         for n in self.model.kind(kind).norms)

    # -- sampling range --------------------------------------------------------------------------
    @property
    def full_range(self) -> bool:
        return self.start_percent <= 0.0 and self.end_percent >= 1.0

    def active_at(self, sigmas: Iterable[float] | None) -> bool:
        """Whether the layer acts in a model call at these sigmas (one per batch row).

        Any row inside the range activates it (one call cannot be half protected). Without
        sigmas only the full range can be decided; a partial range then fails closed.
        """
        values = None if sigmas is None else [float(s) for s in sigmas]
        if not values:
            if self.full_range:
                return True
            raise SafeRoPEError(
                f"SafeRoPE ({self.name}): this model call carries no sigma, so the start/end range "
                f"[{self.start_percent}, {self.end_percent}] cannot be applied; refusing to guess")
        return any(self.sigma_end <= s <= self.sigma_start for s in values)

    # -- the transform ---------------------------------------------------------------------------
    def transform(self, kind: str, index: int, which: str, x: Tensor, *, txt_len: int, stream: str,
                  record: CallRecord, img_first: bool = False) -> Tensor:
        """SafeRoPE on ``(B, H, L, D)`` queries (``which="q"``) or keys (``"k"``) of one block.

        ``txt_len`` text tokens lead the sequence, or trail it with ``img_first`` (the model's
        order: :meth:`.compat.ComfyModel.img_first`). Outside the sampling range the tensor passes
        unchanged (the same object); a risk sink on the record still receives the scores,
        computed with strength 0.
        """
        strength = self.strength if record.active else 0.0
        if record.sink is None:
            if strength == 0.0:
                return x
            return self.adapter.apply(kind, index, which, x, txt_len=txt_len, img_first=img_first, strength=strength,
                                      threshold=self.threshold)
        x2, risk = self.adapter.apply(kind, index, which, x, txt_len=txt_len, img_first=img_first, strength=strength,
                                      threshold=self.threshold, return_risk=True)
        if risk is not None:
            record.sink.add(self, kind, index, stream, which, risk[0], risk[1], txt_len=txt_len, rotated=strength > 0.0,
                            img_first=img_first)
        return x2

    def transform_qk(self, kind: str, index: int, q: Tensor, k: Tensor, *, txt_len: int, stream: str,
                     record: CallRecord, img_first: bool = False) -> tuple[Tensor, Tensor]:
        """:meth:`transform` of queries and keys of one block together (one engine call for both)."""
        strength = self.strength if record.active else 0.0
        if record.sink is None:
            if strength == 0.0:
                return q, k
            return self.adapter.apply_qk(kind, index, q, k, txt_len=txt_len, img_first=img_first, strength=strength,
                                         threshold=self.threshold)
        q2, k2, risk = self.adapter.apply_qk(kind, index, q, k, txt_len=txt_len, img_first=img_first, strength=strength,
                                             threshold=self.threshold, return_risk=True)
        if risk is not None:
            for which, rho, gate in (("q", risk.rho_q, risk.gated_q), ("k", risk.rho_k, risk.gated_k)):
                record.sink.add(self, kind, index, stream, which, rho, gate, txt_len=txt_len, rotated=strength > 0.0,
                                img_first=img_first)
        return q2, k2
