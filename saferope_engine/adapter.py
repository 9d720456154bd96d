"""SafeRoPE adapters in memory and on disk (format v1, design §4).

An adapter is a set of :class:`BlockAdapter` (one per patched attention block) plus
:class:`AdapterMeta` describing the target model. On disk it is one ``.safetensors`` file:

* header metadata (strings): ``format=saferope.adapter``, ``format_version=1``, ``arch=flux``,
  ``num_heads``, ``head_dim``, ``num_double_blocks``, ``num_single_blocks``, ``rank``,
  ``threshold``, ``concepts`` (JSON list), ``base_model``, optional ``saferope.config`` (JSON);
* tensors ``{kind}.{b}.heads`` (int64 ``[n]``), ``{kind}.{b}.U_q`` / ``U_k`` (float32
  ``[n, D, r]``, orthonormal columns), ``{kind}.{b}.A_txt`` / ``A_img`` (float32 ``[n, r, r]``,
  skew-symmetric, each optional but not both absent), ``kind`` ∈ {``double``, ``single``}.

Loading never unpickles anything, and rejects every malformed file with an
:class:`~saferope_engine.errors.AdapterFormatError` that names the file and the tensor or key.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from .errors import AdapterFormatError, IncompatibleAdapterError

logger = logging.getLogger(__name__)

FORMAT = "saferope.adapter"
FORMAT_VERSION = 1
BLOCK_KINDS = ("double", "single")
SEGMENTS = ("txt", "img")
ORTHONORMAL_TOL = 1e-3
SKEW_RTOL = 1e-4

_REQUIRED_KEYS = (
    "format", "format_version", "arch", "num_heads", "head_dim",
    "num_double_blocks", "num_single_blocks", "rank", "threshold", "concepts", "base_model",
)
_OPTIONAL_KEYS = ("saferope.config",)
_TENSOR_RE = re.compile(r"^(double|single)\.(0|[1-9][0-9]*)\.(heads|U_q|U_k|A_txt|A_img)$")
_FIELDS = ("heads", "U_q", "U_k", "A_txt", "A_img")


def _fail(source: str | None, what: str, msg: str) -> AdapterFormatError:
    where = f"{source}: " if source else ""
    return AdapterFormatError(f"{where}{what}: {msg}")


@dataclass(frozen=True)
class AdapterMeta:
    """What an adapter was built for, and how. Mirrors the header metadata of format v1."""

    num_heads: int
    head_dim: int
    num_double_blocks: int
    num_single_blocks: int
    rank: int
    threshold: float = 0.5
    concepts: tuple[str, ...] = ()
    base_model: str = ""
    arch: str = "flux"
    config: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("num_heads", "head_dim", "rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise AdapterFormatError(f"metadata {name!r} must be a positive integer, got {v!r}")
        for name in ("num_double_blocks", "num_single_blocks"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise AdapterFormatError(f"metadata {name!r} must be a non-negative integer, got {v!r}")
        if self.rank > self.head_dim:
            raise AdapterFormatError(f"metadata 'rank' ({self.rank}) exceeds 'head_dim' ({self.head_dim})")
        if not (isinstance(self.threshold, (int, float)) and 0.0 <= float(self.threshold) < 1.0):
            raise AdapterFormatError(f"metadata 'threshold' must be in [0, 1), got {self.threshold!r}")
        object.__setattr__(self, "threshold", float(self.threshold))
        if isinstance(self.concepts, str) or not all(isinstance(c, str) for c in self.concepts):
            raise AdapterFormatError(f"metadata 'concepts' must be a list of strings, got {self.concepts!r}")
        object.__setattr__(self, "concepts", tuple(self.concepts))
        if self.arch != "flux":
            raise AdapterFormatError(f"metadata 'arch' must be 'flux', got {self.arch!r}")
        if not isinstance(self.base_model, str):
            raise AdapterFormatError(f"metadata 'base_model' must be a string, got {self.base_model!r}")
        if self.config is not None and not isinstance(self.config, Mapping):
            raise AdapterFormatError("metadata 'saferope.config' must be a JSON object")

    def num_blocks(self, kind: str) -> int:
        return self.num_double_blocks if kind == "double" else self.num_single_blocks

    def to_header(self) -> dict[str, str]:
        header = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "arch": self.arch,
            "num_heads": str(self.num_heads),
            "head_dim": str(self.head_dim),
            "num_double_blocks": str(self.num_double_blocks),
            "num_single_blocks": str(self.num_single_blocks),
            "rank": str(self.rank),
            "threshold": repr(self.threshold),
            "concepts": json.dumps(list(self.concepts)),
            "base_model": self.base_model,
        }
        if self.config is not None:
            header["saferope.config"] = json.dumps(self.config, sort_keys=True)
        return header

    @classmethod
    def from_header(cls, header: Mapping[str, str] | None, source: str | None = None) -> "AdapterMeta":
        if not header:
            raise _fail(source, "metadata", "missing (not a SafeRoPE adapter file)")
        if header.get("format") != FORMAT:
            raise _fail(source, "metadata 'format'", f"expected {FORMAT!r}, got {header.get('format')!r}")
        version = header.get("format_version")
        if version != str(FORMAT_VERSION):
            raise _fail(source, "metadata 'format_version'",
                        f"unsupported version {version!r} (this build reads {FORMAT_VERSION})")
        missing = [k for k in _REQUIRED_KEYS if k not in header]
        if missing:
            raise _fail(source, "metadata", f"missing keys {missing}")
        unknown = sorted(set(header) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
        if unknown:
            raise _fail(source, "metadata", f"unknown keys {unknown}")

        def as_int(key: str) -> int:
            v = header[key]
            if not re.fullmatch(r"[0-9]+", v):
                raise _fail(source, f"metadata {key!r}", f"not an integer: {v!r}")
            return int(v)

        try:
            threshold = float(header["threshold"])
        except ValueError:
            raise _fail(source, "metadata 'threshold'", f"not a number: {header['threshold']!r}") from None
        if not math.isfinite(threshold):
            raise _fail(source, "metadata 'threshold'", f"not finite: {header['threshold']!r}")
        try:
            concepts = json.loads(header["concepts"])
        except json.JSONDecodeError as e:
            raise _fail(source, "metadata 'concepts'", f"invalid JSON ({e})") from None
        if not isinstance(concepts, list):
            raise _fail(source, "metadata 'concepts'", "must be a JSON list of strings")
        config = None
        if "saferope.config" in header:
            try:
                config = json.loads(header["saferope.config"])
            except json.JSONDecodeError as e:
                raise _fail(source, "metadata 'saferope.config'", f"invalid JSON ({e})") from None
        try:
            return cls(
                num_heads=as_int("num_heads"), head_dim=as_int("head_dim"),
                num_double_blocks=as_int("num_double_blocks"), num_single_blocks=as_int("num_single_blocks"),
                rank=as_int("rank"), threshold=threshold, concepts=tuple(concepts),
                base_model=header["base_model"], arch=header["arch"], config=config,
            )
        except AdapterFormatError as e:
            raise _fail(source, "metadata", str(e)) from None


@dataclass(eq=False)
class BlockAdapter:
    """SafeRoPE parameters of one attention block (``kind`` ∈ {double, single}, index ``index``).

    Row ``i`` of every tensor belongs to head ``heads[i]``. ``A_txt`` rotates text tokens,
    ``A_img`` image tokens (reference-image tokens included); ``None`` leaves that segment alone.
    """

    kind: str
    index: int
    heads: Tensor  # (n,) int64
    U_q: Tensor  # (n, D, r)
    U_k: Tensor  # (n, D, r)
    A_txt: Tensor | None = None  # (n, r, r)
    A_img: Tensor | None = None  # (n, r, r)
    _runtime: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def key(self) -> str:
        return f"{self.kind}.{self.index}"

    @property
    def rank(self) -> int:
        return int(self.U_q.shape[-1])

    @property
    def head_dim(self) -> int:
        return int(self.U_q.shape[-2])

    def generator(self, segment: str) -> Tensor | None:
        return self.A_txt if segment == "txt" else self.A_img

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        for name in _FIELDS:
            t = getattr(self, name)
            if t is not None:
                yield f"{self.key}.{name}", t


def _check_block(block: BlockAdapter, meta: AdapterMeta, source: str | None) -> None:
    """Every rule of design §4 that concerns one block; raises AdapterFormatError."""
    key = block.key
    if block.kind not in BLOCK_KINDS:
        raise _fail(source, key, f"unknown block kind {block.kind!r}")
    if not (0 <= block.index < meta.num_blocks(block.kind)):
        raise _fail(source, f"{key}.*", f"block index {block.index} out of range "
                    f"(model has {meta.num_blocks(block.kind)} {block.kind} blocks)")
    H, D, r = meta.num_heads, meta.head_dim, meta.rank
    heads = block.heads
    if not isinstance(heads, Tensor) or heads.dtype != torch.int64:
        raise _fail(source, f"{key}.heads", f"dtype must be int64, got {getattr(heads, 'dtype', type(heads))}")
    if heads.ndim != 1 or heads.numel() == 0:
        raise _fail(source, f"{key}.heads", f"shape must be [n] with n ≥ 1, got {list(heads.shape)}")
    n = heads.numel()
    if int(heads.min()) < 0 or int(heads.max()) >= H:
        raise _fail(source, f"{key}.heads", f"head index out of range [0, {H}): {heads.tolist()}")
    if torch.unique(heads).numel() != n:
        raise _fail(source, f"{key}.heads", f"duplicate head indices: {heads.tolist()}")
    if block.A_txt is None and block.A_img is None:
        raise _fail(source, key, "block has neither A_txt nor A_img")
    for name, shape in (("U_q", (n, D, r)), ("U_k", (n, D, r)), ("A_txt", (n, r, r)), ("A_img", (n, r, r))):
        t = getattr(block, name)
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.dtype != torch.float32:
            raise _fail(source, f"{key}.{name}", f"dtype must be float32, got {getattr(t, 'dtype', type(t))}")
        if tuple(t.shape) != shape:
            raise _fail(source, f"{key}.{name}", f"shape must be {list(shape)}, got {list(t.shape)}")
        t = t.detach()
        if not bool(torch.isfinite(t).all()):
            raise _fail(source, f"{key}.{name}", "contains NaN or infinite values")
        if name.startswith("U"):
            gram = t.double().transpose(-1, -2) @ t.double()  # (n,r,r)
            err = torch.linalg.matrix_norm(gram - torch.eye(r, dtype=torch.float64)).max().item()
            if err > ORTHONORMAL_TOL:
                raise _fail(source, f"{key}.{name}", f"columns not orthonormal (‖UᵀU − I‖ = {err:.3g} > {ORTHONORMAL_TOL})")
        else:
            t64 = t.double()
            err = torch.linalg.matrix_norm(t64 + t64.transpose(-1, -2))  # (n,)
            lim = SKEW_RTOL * (1.0 + torch.linalg.matrix_norm(t64))
            if bool((err > lim).any()):
                raise _fail(source, f"{key}.{name}", f"not skew-symmetric (‖A + Aᵀ‖ = {err.max().item():.3g})")


class SafeRoPEAdapter:
    """A validated SafeRoPE adapter: metadata plus one :class:`BlockAdapter` per patched block.

    Build one with :func:`~saferope_engine.subspace.assemble_adapter`, load one with
    :func:`load_adapter`, write one with :meth:`save`. Tensors live on the CPU in float32;
    :func:`~saferope_engine.core.saferope_qk` caches device copies per block.
    """

    def __init__(self, meta: AdapterMeta, blocks: list[BlockAdapter] | tuple[BlockAdapter, ...],
                 *, source: str | None = None, validate: bool = True) -> None:
        self.meta = meta
        self.source = source
        self.blocks: dict[tuple[str, int], BlockAdapter] = {}
        for b in sorted(blocks, key=lambda b: (BLOCK_KINDS.index(b.kind) if b.kind in BLOCK_KINDS else 9, b.index)):
            if (b.kind, b.index) in self.blocks:
                raise _fail(source, b.key, "block given twice")
            self.blocks[(b.kind, b.index)] = b
        if validate:
            self.validate()

    # -- validation and compatibility -------------------------------------------------------
    def validate(self) -> None:
        """Check every rule of format v1; raises :class:`AdapterFormatError`."""
        if not self.blocks:
            raise _fail(self.source, "tensors", "adapter patches no block")
        for b in self.blocks.values():
            _check_block(b, self.meta, self.source)

    def check_compatible(self, *, num_heads: int, head_dim: int, num_double_blocks: int,
                         num_single_blocks: int) -> None:
        """Raise :class:`IncompatibleAdapterError` unless the model has exactly these shapes."""
        m = self.meta
        diffs = [f"{name}: adapter {a}, model {b}" for name, a, b in (
            ("num_heads", m.num_heads, num_heads), ("head_dim", m.head_dim, head_dim),
            ("num_double_blocks", m.num_double_blocks, num_double_blocks),
            ("num_single_blocks", m.num_single_blocks, num_single_blocks)) if a != b]
        if diffs:
            name = f"adapter {self.source!r}" if self.source else "adapter"
            raise IncompatibleAdapterError(
                f"{name} (base model {m.base_model or 'unknown'!r}) does not fit this model — " + "; ".join(diffs))

    # -- access ----------------------------------------------------------------------------
    def block(self, kind: str, index: int) -> BlockAdapter | None:
        return self.blocks.get((kind, index))

    def block_keys(self, kind: str | None = None) -> list[tuple[str, int]]:
        return [k for k in self.blocks if kind is None or k[0] == kind]

    def num_parameters(self) -> int:
        """Free parameters of the generators (``r(r−1)/2`` per head and segment)."""
        r = self.meta.rank
        return sum(b.heads.numel() * r * (r - 1) // 2 * sum(a is not None for a in (b.A_txt, b.A_img))
                   for b in self.blocks.values())

    def summary(self) -> dict[str, Any]:
        """Plain-data description (what ``trainer inspect`` prints)."""
        m = self.meta
        blocks = []
        for b in self.blocks.values():
            blocks.append({
                "block": b.key, "heads": b.heads.tolist(),
                "segments": [s for s in SEGMENTS if b.generator(s) is not None],
                "generator_norms": {s: [round(float(x), 6) for x in torch.linalg.matrix_norm(b.generator(s).detach())]
                                    for s in SEGMENTS if b.generator(s) is not None},
            })
        return {
            "source": self.source, "arch": m.arch, "base_model": m.base_model, "concepts": list(m.concepts),
            "num_heads": m.num_heads, "head_dim": m.head_dim, "num_double_blocks": m.num_double_blocks,
            "num_single_blocks": m.num_single_blocks, "rank": m.rank, "threshold": m.threshold,
            "num_blocks_patched": len(self.blocks),
            "num_heads_patched": sum(b.heads.numel() for b in self.blocks.values()),
            "num_parameters": self.num_parameters(), "config": dict(m.config) if m.config else None,
            "blocks": blocks,
        }

    def __repr__(self) -> str:
        m = self.meta
        return (f"SafeRoPEAdapter(concepts={list(m.concepts)}, rank={m.rank}, blocks={len(self.blocks)}, "
                f"heads={sum(b.heads.numel() for b in self.blocks.values())}, threshold={m.threshold}, "
                f"source={self.source!r})")

    # -- application ----------------------------------------------------------------------
    def apply_qk(self, kind: str, index: int, q: Tensor, k: Tensor, *, txt_len: int, strength: float = 1.0,
                 threshold: float | None = None, return_risk: bool = False, inplace: bool = False):
        """Apply this adapter's block ``(kind, index)`` to ``(B, H, L, D)`` queries and keys.

        Blocks the adapter does not patch come back untouched (same objects). See
        :func:`~saferope_engine.core.saferope_qk` for the arguments.
        """
        from .core import saferope_qk  # local: core imports this module

        H, D = q.shape[1], q.shape[-1]
        if H != self.meta.num_heads or D != self.meta.head_dim:
            raise IncompatibleAdapterError(
                f"adapter {self.source or ''} expects {self.meta.num_heads} heads × {self.meta.head_dim}, "
                f"got q of shape {tuple(q.shape)} in {kind} block {index}")
        block = self.block(kind, index)
        tau = self.meta.threshold if threshold is None else threshold
        if block is None:
            return (q, k, None) if return_risk else (q, k)
        return saferope_qk(q, k, block, txt_len=txt_len, strength=strength, threshold=tau, return_risk=return_risk,
                           inplace=inplace)

    # -- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {name: t.detach().to("cpu").contiguous() for b in self.blocks.values() for name, t in b.tensors()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write format v1 atomically (a temporary file renamed into place). Returns the path."""
        from safetensors.torch import save_file

        self.validate()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(self.state_dict(), tmp, metadata=self.meta.to_header())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        logger.info("saved SafeRoPE adapter to %s (%d blocks)", path, len(self.blocks))
        return path

    @classmethod
    def from_state(cls, tensors: Mapping[str, Tensor], header: Mapping[str, str] | None,
                   source: str | None = None) -> "SafeRoPEAdapter":
        """Build and validate an adapter from a safetensors state dict and its header."""
        meta = AdapterMeta.from_header(header, source)
        grouped: dict[tuple[str, int], dict[str, Tensor]] = {}
        for name in tensors:
            m = _TENSOR_RE.match(name)
            if not m:
                raise _fail(source, f"tensor {name!r}", "unknown tensor name")
            grouped.setdefault((m.group(1), int(m.group(2))), {})[m.group(3)] = tensors[name]
        blocks = []
        for (kind, index), parts in grouped.items():
            for req in ("heads", "U_q", "U_k"):
                if req not in parts:
                    raise _fail(source, f"{kind}.{index}.{req}", "missing")
            blocks.append(BlockAdapter(kind, index, parts["heads"], parts["U_q"], parts["U_k"],
                                       parts.get("A_txt"), parts.get("A_img")))
        return cls(meta, blocks, source=source)


def load_adapter(path: str | os.PathLike) -> SafeRoPEAdapter:
    """Read and validate a format-v1 adapter file. Raises :class:`AdapterFormatError` naming the file."""
    from safetensors import safe_open

    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise _fail(source, "file", "not found" if not path.exists() else "not a regular file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata()
            names = list(f.keys())
            # Validate the header and the names before reading any tensor data.
            AdapterMeta.from_header(header, source)
            for name in names:
                if not _TENSOR_RE.match(name):
                    raise _fail(source, f"tensor {name!r}", "unknown tensor name")
            tensors = {name: f.get_tensor(name) for name in names}
    except AdapterFormatError:
        raise
    except Exception as e:  # safetensors raises several types for truncated/corrupt files
        raise _fail(source, "file", f"not a readable safetensors file ({type(e).__name__}: {e})") from None
    return SafeRoPEAdapter.from_state(tensors, header, source)
