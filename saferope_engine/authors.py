"""Import the SafeRoPE authors' checkpoint (``rotary_adapter_s_param.pth`` layout).

Their ``RotaryAdapter`` state dict holds, for ``nD`` double and ``nS`` single blocks, ``H`` heads,
head dim ``D`` and rank ``r``:

* ``S_param_Double.{i}``: ``(H, r, r)`` — applied to text tokens of double block ``i``;
* ``S_param_Single.{i}``: ``(2, H, r, r)`` — two generators of single block ``i``;
* ``_U_query_cache_D`` / ``_U_key_cache_D``: ``(nD, H, D, r)``; ``…_S``: ``(nS, H, D, r)``;
  heads they excluded have an all-zero basis.

Conventions (design §2): their code multiplies a *row* coefficient vector by ``exp(g·S)``, so our
generator is ``A = Sᵀ``; their optimiser does not keep ``S`` skew, so we keep the skew part
``(Sᵀ − S)/2`` and report the size of the discarded symmetric part. Their single blocks split the
sequence at a hard-coded token 4096 believing image tokens come first (they do not: the joint
sequence is text first), so ``S_param_Single[i][0]`` was meant for image tokens and ``[1]`` for
text tokens; ``single_segments`` makes that mapping explicit. Their fp16 bases are re-orthonormalised
(nearest orthonormal matrix, same span) and the correction is reported.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .adapter import AdapterMeta, BlockAdapter, SafeRoPEAdapter
from .errors import AdapterFormatError

logger = logging.getLogger(__name__)

__all__ = ["ImportReport", "import_authors_state_dict", "load_authors_checkpoint"]

_PARAM_RE = re.compile(r"^(?:.*\.)?S_param_(Double|Single)\.(\d+)$")
_U_RE = re.compile(r"^(?:.*\.)?_U_(query|key)_cache_([DS])$")


@dataclass
class ImportReport:
    """What the importer changed or dropped, for the user to read."""

    dropped_heads: dict[str, list[int]] = field(default_factory=dict)
    max_symmetric_part: float = 0.0  # max over generators of ‖(S + Sᵀ)/2‖ / ‖S‖
    max_orthonormality_fix: float = 0.0  # max ‖UᵀU − I‖ before re-orthonormalisation
    skipped_blocks: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"discarded symmetric part of S: up to {self.max_symmetric_part:.3g} of ‖S‖",
               f"re-orthonormalised bases: ‖UᵀU − I‖ was up to {self.max_orthonormality_fix:.3g}"]
        if self.dropped_heads:
            out.append("dropped heads with an all-zero basis: " + ", ".join(
                f"{k}: {v}" for k, v in self.dropped_heads.items()))
        if self.skipped_blocks:
            out.append("blocks without any usable head: " + ", ".join(self.skipped_blocks))
        return out


def _polar(U: Tensor) -> tuple[Tensor, float]:
    """Nearest matrix with orthonormal columns (same column span); returns it and ‖UᵀU − I‖."""
    U64 = U.to(torch.float64)
    r = U64.shape[-1]
    err = float(torch.linalg.matrix_norm(U64.transpose(-1, -2) @ U64 - torch.eye(r, dtype=torch.float64)).max())
    W, _, Vh = torch.linalg.svd(U64, full_matrices=False)
    return (W @ Vh).to(torch.float32), err


def import_authors_state_dict(sd: Mapping[str, Tensor], *, threshold: float = 0.7,
                              single_segments: tuple[str, str] = ("img", "txt"),
                              concepts: tuple[str, ...] = ("nudity",),
                              base_model: str = "FLUX.1-dev", source: str | None = None,
                              ) -> tuple[SafeRoPEAdapter, ImportReport]:
    """Convert the authors' state dict into a :class:`SafeRoPEAdapter`.

    Args:
        threshold: default τ stored in the adapter (the authors use 0.7).
        single_segments: segment of ``S_param_Single[i][0]`` and ``[1]`` (default image, text).
    """
    where = source or "checkpoint"
    if sorted(single_segments) != ["img", "txt"]:
        raise ValueError(f"single_segments must be a permutation of ('img', 'txt'), got {single_segments}")
    params: dict[tuple[str, int], Tensor] = {}
    bases: dict[tuple[str, str], Tensor] = {}
    for name, t in sd.items():
        if m := _PARAM_RE.match(name):
            params[("double" if m.group(1) == "Double" else "single", int(m.group(2)))] = t
        elif m := _U_RE.match(name):
            bases[(m.group(1), "double" if m.group(2) == "D" else "single")] = t
    missing = [f"_U_{w}_cache_{k}" for w in ("query", "key") for k in ("D", "S")
               if (w, "double" if k == "D" else "single") not in bases]
    if missing or not params:
        raise AdapterFormatError(f"{where}: not the authors' RotaryAdapter layout (missing "
                                 f"{missing or ['S_param_Double.*/S_param_Single.*']})")
    nD, H, D, r = bases[("query", "double")].shape
    nS = bases[("query", "single")].shape[0]
    for key, t in bases.items():
        expect = (nD if key[1] == "double" else nS, H, D, r)
        if tuple(t.shape) != expect:
            raise AdapterFormatError(f"{where}: _U_{key[0]}_cache_{key[1][0].upper()} has shape "
                                     f"{list(t.shape)}, expected {list(expect)}")
    report = ImportReport()
    blocks = []
    for (kind, idx), S in sorted(params.items()):
        n_blocks = nD if kind == "double" else nS
        expect = (H, r, r) if kind == "double" else (2, H, r, r)
        if tuple(S.shape) != expect or idx >= n_blocks:
            raise AdapterFormatError(f"{where}: S_param_{kind.capitalize()}.{idx} has shape {list(S.shape)}, "
                                     f"expected {list(expect)} (and index < {n_blocks})")
        S = S.detach().to(torch.float64)
        if not bool(torch.isfinite(S).all()):
            raise AdapterFormatError(f"{where}: S_param_{kind.capitalize()}.{idx} has non-finite values")
        Uq = bases[("query", kind)][idx].detach().to(torch.float64)  # (H, D, r)
        Uk = bases[("key", kind)][idx].detach().to(torch.float64)
        live = [h for h in range(H) if bool(Uq[h].abs().sum() > 0) and bool(Uk[h].abs().sum() > 0)]
        dead = sorted(set(range(H)) - set(live))
        if dead:
            report.dropped_heads[f"{kind}.{idx}"] = dead
        if not live:
            report.skipped_blocks.append(f"{kind}.{idx}")
            continue
        heads = torch.tensor(live, dtype=torch.int64)
        Sl = S[..., heads, :, :]  # (n, r, r) or (2, n, r, r)
        A = 0.5 * (Sl.transpose(-1, -2) - Sl)  # skew part of Sᵀ
        sym = 0.5 * (Sl + Sl.transpose(-1, -2))
        rel = torch.linalg.matrix_norm(sym) / torch.linalg.matrix_norm(Sl).clamp_min(1e-30)
        report.max_symmetric_part = max(report.max_symmetric_part, float(rel.max()))
        Uq_n, eq = _polar(Uq[heads])
        Uk_n, ek = _polar(Uk[heads])
        report.max_orthonormality_fix = max(report.max_orthonormality_fix, eq, ek)
        A = A.to(torch.float32)
        gens = {"txt": A} if kind == "double" else {single_segments[0]: A[0], single_segments[1]: A[1]}
        blocks.append(BlockAdapter(kind, idx, heads, Uq_n, Uk_n, gens.get("txt"), gens.get("img")))
    meta = AdapterMeta(num_heads=H, head_dim=D, blocks={"double": nD, "single": nS}, arch="flux1", rank=r,
                       threshold=threshold, concepts=tuple(concepts), base_model=base_model,
                       config={"imported_from": "deng12yx/SafeRoPE RotaryAdapter", "source": os.path.basename(where),
                               "single_segments": list(single_segments)})
    for line in report.lines():
        logger.info("import %s: %s", where, line)
    return SafeRoPEAdapter(meta, blocks, source=source), report


def load_authors_checkpoint(path: str | os.PathLike, **kwargs) -> tuple[SafeRoPEAdapter, ImportReport]:
    """Read ``rotary_adapter_s_param.pth`` with ``torch.load(weights_only=True)`` and import it."""
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise AdapterFormatError(f"{path}: cannot read as a weights-only torch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise AdapterFormatError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return import_authors_state_dict(sd, source=str(path), **kwargs)
