"""SafeRoPE adapters in memory and on disk (format v2, design §4 and §8; v1 files still load).

An adapter is a set of :class:`BlockAdapter` (one per patched attention block) plus
:class:`AdapterMeta` describing the target model. On disk it is one ``.safetensors`` file:

* header metadata (strings): ``format=saferope.adapter``, ``format_version=2``, ``arch`` (a model
  family id of :mod:`saferope_engine.arch`), ``blocks`` (JSON object: block kind → count),
  ``num_heads``, ``head_dim``, optional ``num_kv_heads`` (keys with fewer heads), ``rank``,
  ``threshold``, ``concepts`` (JSON list), ``base_model``, optional ``saferope.config`` (JSON),
  ``content_sha256`` (checksum of the tensors, see :func:`content_sha256`);
* tensors ``{kind}.{b}.heads`` (int64 ``[n]``), ``{kind}.{b}.U_q`` (float32 ``[n, D, r]``) and
  ``{kind}.{b}.U_k`` (float32 ``[n_k, D, r]``, ``n_k = n`` unless keys have fewer heads), both
  with orthonormal columns, ``{kind}.{b}.A_txt`` / ``A_img`` (float32 ``[n, r, r]``,
  skew-symmetric, each optional but not both absent, only for segments the kind's tokens carry).

Format v1 (``arch=flux``, ``num_double_blocks``, ``num_single_blocks``, no checksum) is read as
family ``flux1`` with kinds ``double``/``single``; everything written is v2.

Loading never unpickles anything, and rejects every malformed file with an
:class:`~saferope_engine.errors.AdapterFormatError` that names the file and the tensor or key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from . import arch as archs
from .arch import SEGMENTS, ModelShapes
from .errors import AdapterFormatError, IncompatibleAdapterError

logger = logging.getLogger(__name__)

__all__ = ["FORMAT", "FORMAT_VERSION", "SEGMENTS", "MAX_GENERATOR_NORM", "AdapterMeta", "BlockAdapter",
           "SafeRoPEAdapter", "load_adapter", "content_sha256", "ModelShapes"]

FORMAT = "saferope.adapter"
FORMAT_VERSION = 2
ORTHONORMAL_TOL = 1e-3
SKEW_RTOL = 1e-4
#: Largest accepted ‖A‖_F of one head's generator. A token rotates by ``s·θ_j`` (``s = α·ρ``,
#: ``θ_j ≤ ‖A‖_F/√2``); angles are periodic, so beyond a few π a larger generator only aliases,
#: and trained generators stay well below 10. A norm above this bound means a diverged run or a
#: damaged file; it also bounds the work of the differentiable series (:mod:`.rotation`).
MAX_GENERATOR_NORM = 256.0
#: Size limits of the metadata (absurd values are errors, not allocations).
MAX_HEADS, MAX_HEAD_DIM, MAX_BLOCKS = 4096, 4096, 10_000
MAX_CONCEPTS, MAX_TEXT, MAX_CONFIG_BYTES, MAX_JSON_DEPTH = 256, 4096, 4 << 20, 64

_V1_KEYS = ("format", "format_version", "arch", "num_heads", "head_dim", "num_double_blocks", "num_single_blocks",
            "rank", "threshold", "concepts", "base_model")
_V2_KEYS = ("format", "format_version", "arch", "blocks", "num_heads", "head_dim", "rank", "threshold", "concepts",
            "base_model")
_OPTIONAL = {1: ("saferope.config",), 2: ("saferope.config", "num_kv_heads", "content_sha256")}
_TENSOR_RE = re.compile(r"^([a-z][a-z0-9_]{0,31})\.(0|[1-9][0-9]{0,4})\.(heads|U_q|U_k|A_txt|A_img)$")
_FIELDS = ("heads", "U_q", "U_k", "A_txt", "A_img")
#: dtype spelling of the safetensors header (what :func:`content_sha256` hashes).
_ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def _fail(source: str | None, what: str, msg: str) -> AdapterFormatError:
    where = f"{source}: " if source else ""
    return AdapterFormatError(f"{where}{what}: {msg}")


def _check_text(value: Any, what: str, limit: int = MAX_TEXT) -> str:
    """A metadata string: no NUL, no lone surrogate, at most ``limit`` characters."""
    if not isinstance(value, str):
        raise AdapterFormatError(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise AdapterFormatError(f"{what} is {len(value)} characters long (at most {limit})")
    if "\x00" in value:
        raise AdapterFormatError(f"{what} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise AdapterFormatError(f"{what} contains a lone surrogate (not valid Unicode text)") from None
    return value


def _json_loads(text: str, source: str | None, key: str) -> Any:
    """Strict JSON: no NaN/Infinity, integers of at most 18 digits, nesting at most MAX_JSON_DEPTH."""
    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    def small_int(digits: str) -> int:
        if len(digits.lstrip("-")) > 18:
            raise ValueError(f"integer of {len(digits)} digits")
        return int(digits)

    if len(text) > MAX_CONFIG_BYTES:
        raise _fail(source, f"metadata {key!r}", f"{len(text)} characters (at most {MAX_CONFIG_BYTES})")
    depth = level = 0
    in_str = esc = False
    for ch in text:  # nesting depth before the recursive parser sees it
        if in_str:
            esc = not esc and ch == "\\"
            in_str = esc or ch != '"'
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            level += 1
            depth = max(depth, level)
            if depth > MAX_JSON_DEPTH:
                raise _fail(source, f"metadata {key!r}", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        elif ch in "]}":
            level -= 1
    try:
        return json.loads(text, parse_constant=no_constant, parse_int=small_int)
    except (ValueError, RecursionError) as e:
        raise _fail(source, f"metadata {key!r}", f"invalid JSON ({type(e).__name__}: {e})") from None


def _check_config(obj: Any, path: str = "saferope.config") -> None:
    """Values of the build config: finite numbers, valid strings (recursively)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise AdapterFormatError(f"metadata {path!r} holds a non-finite number")
    if isinstance(obj, str):
        _check_text(obj, f"metadata {path!r}", MAX_CONFIG_BYTES)
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _check_text(k, f"metadata {path!r} key", MAX_TEXT)
            _check_config(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_config(v, f"{path}[{i}]")


def content_sha256(tensors: Mapping[str, Tensor]) -> str:
    """Lower-case hex SHA-256 of an adapter's tensors (design §8).

    For each tensor in ascending order of its name, with no separators: the name in UTF-8, the
    dtype as the safetensors header spells it (``F32``, ``I64``), the shape as compact JSON
    (``[2,128,2]``), the raw bytes, little-endian, C order. Metadata is not hashed.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _ST_DTYPES:
            raise AdapterFormatError(f"tensor {name!r}: dtype {t.dtype} cannot be stored")
        data = t.clone().view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        if sys.byteorder != "little" and t.element_size() > 1:  # pragma: no cover - big-endian hosts
            data = data.view(-1, t.element_size()).flip(-1)
        h.update(name.encode("utf-8"))
        h.update(_ST_DTYPES[t.dtype].encode("ascii"))
        h.update(json.dumps(list(t.shape), separators=(",", ":")).encode("ascii"))
        h.update(bytes(data.contiguous().untyped_storage()) if data.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class AdapterMeta:
    """What an adapter was built for, and how. Mirrors the header metadata of format v2.

    Attributes:
        num_heads, head_dim: of the target model's queries.
        rank: ``r`` of every subspace.
        blocks: block kind → number of such blocks in the target model, for every kind of ``arch``.
        arch: the model family (:mod:`saferope_engine.arch` id).
        num_kv_heads: key heads when keys have fewer heads than queries (GQA), else ``None``.
    """

    num_heads: int
    head_dim: int
    rank: int
    blocks: Mapping[str, int]
    arch: str = "flux1"
    num_kv_heads: int | None = None
    threshold: float = 0.5
    concepts: tuple[str, ...] = ()
    base_model: str = ""
    config: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        for name, hi in (("num_heads", MAX_HEADS), ("head_dim", MAX_HEAD_DIM), ("rank", MAX_HEAD_DIM)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= hi:
                raise AdapterFormatError(f"metadata {name!r} must be an integer in [1, {hi}], got {v!r}")
        if self.rank > self.head_dim:
            raise AdapterFormatError(f"metadata 'rank' ({self.rank}) exceeds 'head_dim' ({self.head_dim})")
        try:
            family = archs.get(self.arch)
        except KeyError as e:
            raise AdapterFormatError(f"metadata 'arch': {e.args[0]}") from None
        if not isinstance(self.blocks, Mapping):
            raise AdapterFormatError("metadata 'blocks' must map block kinds to counts")
        if set(self.blocks) != set(family.kind_names):
            raise AdapterFormatError(f"metadata 'blocks' must give the count of every {family.name} block kind "
                                     f"{list(family.kind_names)}, got {sorted(map(str, self.blocks))}")
        for kind, n in self.blocks.items():
            if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_BLOCKS:
                raise AdapterFormatError(f"metadata 'blocks': {kind} count must be an integer in [0, {MAX_BLOCKS}], got {n!r}")
        object.__setattr__(self, "blocks", MappingProxyType({k: int(self.blocks[k]) for k in family.kind_names}))
        kv = self.num_kv_heads
        if kv is not None:
            if not isinstance(kv, int) or isinstance(kv, bool) or not 1 <= kv <= self.num_heads or self.num_heads % kv:
                raise AdapterFormatError(f"metadata 'num_kv_heads' must divide num_heads ({self.num_heads}), got {kv!r}")
            if kv == self.num_heads:
                object.__setattr__(self, "num_kv_heads", None)
            elif not family.gqa:
                raise AdapterFormatError(f"metadata 'num_kv_heads': {family.name} keys have as many heads as queries")
        if not (isinstance(self.threshold, (int, float)) and not isinstance(self.threshold, bool)
                and 0.0 <= float(self.threshold) < 1.0):
            raise AdapterFormatError(f"metadata 'threshold' must be in [0, 1), got {self.threshold!r}")
        object.__setattr__(self, "threshold", float(self.threshold))
        if isinstance(self.concepts, str) or len(self.concepts) > MAX_CONCEPTS:
            raise AdapterFormatError(f"metadata 'concepts' must be a list of at most {MAX_CONCEPTS} strings")
        for c in self.concepts:
            _check_text(c, "metadata 'concepts' entry", 256)
        object.__setattr__(self, "concepts", tuple(self.concepts))
        _check_text(self.base_model, "metadata 'base_model'")
        if self.config is not None:
            if not isinstance(self.config, Mapping):
                raise AdapterFormatError("metadata 'saferope.config' must be a JSON object")
            _check_config(self.config)

    @property
    def family(self) -> archs.Arch:
        return archs.get(self.arch)

    @property
    def kv_group(self) -> int:
        """Query heads per key head (1 without grouped-query attention)."""
        return 1 if self.num_kv_heads is None else self.num_heads // self.num_kv_heads

    def num_blocks(self, kind: str) -> int:
        return self.blocks.get(kind, 0)

    @property
    def shapes(self) -> ModelShapes:
        return ModelShapes(arch=self.arch, num_heads=self.num_heads, head_dim=self.head_dim, blocks=dict(self.blocks),
                           num_kv_heads=self.num_kv_heads)

    def to_header(self) -> dict[str, str]:
        header = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "arch": self.arch,
            "blocks": json.dumps(dict(self.blocks), separators=(",", ":")),
            "num_heads": str(self.num_heads),
            "head_dim": str(self.head_dim),
            "rank": str(self.rank),
            "threshold": repr(self.threshold),
            "concepts": json.dumps(list(self.concepts)),
            "base_model": self.base_model,
        }
        if self.num_kv_heads is not None:
            header["num_kv_heads"] = str(self.num_kv_heads)
        if self.config is not None:
            header["saferope.config"] = json.dumps(self.config, sort_keys=True, allow_nan=False)
        return header

    @classmethod
    def from_header(cls, header: Mapping[str, str] | None, source: str | None = None) -> AdapterMeta:
        """Parse v1 or v2 header metadata; raises :class:`AdapterFormatError` naming the key."""
        if not header:
            raise _fail(source, "metadata", "missing (not a SafeRoPE adapter file)")
        if header.get("format") != FORMAT:
            raise _fail(source, "metadata 'format'", f"expected {FORMAT!r}, got {str(header.get('format'))[:64]!r}")
        version = header.get("format_version")
        if version not in ("1", "2"):
            raise _fail(source, "metadata 'format_version'",
                        f"unsupported version {str(version)[:16]!r} (this build reads 1 and 2)")
        v = int(version)
        required = _V1_KEYS if v == 1 else _V2_KEYS
        missing = [k for k in required if k not in header]
        if missing:
            raise _fail(source, "metadata", f"missing keys {missing}")
        unknown = sorted(set(header) - set(required) - set(_OPTIONAL[v]))
        if unknown:
            raise _fail(source, "metadata", f"unknown keys {[k[:64] for k in unknown[:8]]}")

        def as_int(key: str) -> int:
            text = header[key]
            if not re.fullmatch(r"[0-9]{1,9}", text):
                raise _fail(source, f"metadata {key!r}", f"not an integer of at most 9 digits: {text[:32]!r}")
            return int(text)

        try:
            threshold = float(header["threshold"][:64])
        except ValueError:
            raise _fail(source, "metadata 'threshold'", f"not a number: {header['threshold'][:32]!r}") from None
        if not math.isfinite(threshold):
            raise _fail(source, "metadata 'threshold'", f"not finite: {header['threshold'][:32]!r}")
        concepts = _json_loads(header["concepts"], source, "concepts")
        if not isinstance(concepts, list):
            raise _fail(source, "metadata 'concepts'", "must be a JSON list of strings")
        config = _json_loads(header["saferope.config"], source, "saferope.config") if "saferope.config" in header else None
        if v == 1:
            if header["arch"] != "flux":
                raise _fail(source, "metadata 'arch'", f"format v1 knows only 'flux', got {header['arch'][:32]!r}")
            family, blocks, kv = "flux1", {"double": as_int("num_double_blocks"), "single": as_int("num_single_blocks")}, None
        else:
            family = header["arch"]
            blocks = _json_loads(header["blocks"], source, "blocks")
            if not isinstance(blocks, dict):
                raise _fail(source, "metadata 'blocks'", "must be a JSON object of block kind → count")
            kv = as_int("num_kv_heads") if "num_kv_heads" in header else None
            digest = header.get("content_sha256")
            if digest is not None and not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise _fail(source, "metadata 'content_sha256'", "not a lower-case hex SHA-256")
        try:
            return cls(num_heads=as_int("num_heads"), head_dim=as_int("head_dim"), rank=as_int("rank"), blocks=blocks,
                       arch=family, num_kv_heads=kv, threshold=threshold, concepts=tuple(concepts),
                       base_model=header["base_model"], config=config)
        except AdapterFormatError as e:
            raise _fail(source, "metadata", str(e)) from None


def key_heads(heads: Tensor, kv_group: int) -> Tensor:
    """Key heads ``heads // kv_group``, deduplicated and ascending (the heads themselves without GQA)."""
    return heads if kv_group == 1 else torch.unique(heads // kv_group)


def key_rows(heads: Tensor, kv_group: int) -> Tensor:
    """For each of :func:`key_heads`, the first row of ``heads`` in its group (whose generator it uses)."""
    if kv_group == 1:
        return torch.arange(heads.numel())
    first: dict[int, int] = {}
    for row, group in enumerate((heads // kv_group).tolist()):
        first.setdefault(group, row)
    return torch.tensor([first[g] for g in sorted(first)], dtype=torch.int64)


@dataclass(eq=False)
class BlockAdapter:
    """SafeRoPE parameters of one attention block (block kind ``kind``, index ``index``).

    Row ``i`` of ``U_q``, ``A_txt`` and ``A_img`` belongs to query head ``heads[i]``. ``U_k`` has
    one row per key head: with grouped-query attention (``kv_group`` > 1 query heads per key head,
    set by :class:`SafeRoPEAdapter` from its metadata) the key heads are ``heads // kv_group``,
    deduplicated and ascending (:attr:`k_heads`); the keys of a shared key head rotate with the
    generator of the first selected query head of its group (:attr:`k_rows`). ``A_txt`` rotates
    text tokens, ``A_img`` image tokens (reference-image tokens included); ``None`` leaves that
    segment alone.
    """

    kind: str
    index: int
    heads: Tensor  # (n,) int64
    U_q: Tensor  # (n, D, r)
    U_k: Tensor  # (n_k, D, r)
    A_txt: Tensor | None = None  # (n, r, r)
    A_img: Tensor | None = None  # (n, r, r)
    kv_group: int = 1
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

    @property
    def k_heads(self) -> Tensor:
        """``(n_k,)`` key heads of the selected query heads."""
        return key_heads(self.heads, self.kv_group)

    @property
    def k_rows(self) -> Tensor:
        """``(n_k,)`` the row (query head) whose generator rotates each key head of :attr:`k_heads`."""
        return key_rows(self.heads, self.kv_group)

    def generator(self, segment: str) -> Tensor | None:
        return self.A_txt if segment == "txt" else self.A_img

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        for name in _FIELDS:
            t = getattr(self, name)
            if t is not None:
                yield f"{self.key}.{name}", t


def _check_block(block: BlockAdapter, meta: AdapterMeta, source: str | None, *, for_file: bool) -> None:
    """Every rule of design §4/§8 that concerns one block; raises AdapterFormatError."""
    key = block.key
    family = meta.family
    if block.kind not in family.kind_names:
        raise _fail(source, key, f"{family.name} has no block kind {block.kind!r} (kinds: {', '.join(family.kind_names)})")
    if not (isinstance(block.index, int) and 0 <= block.index < meta.num_blocks(block.kind)):
        raise _fail(source, f"{key}.*", f"block index {block.index} out of range "
                    f"(model has {meta.num_blocks(block.kind)} {block.kind} blocks)")
    H, D, r = meta.num_heads, meta.head_dim, meta.rank
    heads = block.heads
    if not isinstance(heads, Tensor) or heads.dtype != torch.int64:
        raise _fail(source, f"{key}.heads", f"dtype must be int64, got {getattr(heads, 'dtype', type(heads))}")
    if heads.ndim != 1 or not 1 <= heads.numel() <= H:
        raise _fail(source, f"{key}.heads", f"shape must be [n] with 1 ≤ n ≤ {H}, got {list(heads.shape)}")
    n = heads.numel()
    if int(heads.min()) < 0 or int(heads.max()) >= H:
        raise _fail(source, f"{key}.heads", f"head index out of range [0, {H}): {heads.tolist()[:16]}")
    if torch.unique(heads).numel() != n:
        raise _fail(source, f"{key}.heads", f"duplicate head indices: {heads.tolist()[:16]}")
    if block.kv_group != meta.kv_group:
        raise _fail(source, key, f"kv_group {block.kv_group} differs from the adapter's {meta.kv_group}")
    if block.A_txt is None and block.A_img is None:
        raise _fail(source, key, "block has neither A_txt nor A_img")
    allowed = family.kind(block.kind).segments
    for seg in SEGMENTS:
        if block.generator(seg) is not None and seg not in allowed:
            raise _fail(source, f"{key}.A_{seg}", f"{family.name} {block.kind} blocks carry no {seg} tokens")
    n_k = block.k_heads.numel()
    for name, shape in (("U_q", (n, D, r)), ("U_k", (n_k, D, r)), ("A_txt", (n, r, r)), ("A_img", (n, r, r))):
        t = getattr(block, name)
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.dtype != torch.float32:
            raise _fail(source, f"{key}.{name}", f"dtype must be float32, got {getattr(t, 'dtype', type(t))}")
        if tuple(t.shape) != shape:
            raise _fail(source, f"{key}.{name}", f"shape must be {list(shape)}, got {list(t.shape)}")
        t64 = t.detach().double()
        if not bool(torch.isfinite(t64).all()):
            raise _fail(source, f"{key}.{name}", "contains NaN or infinite values")
        if name.startswith("U"):
            gram = t64.transpose(-1, -2) @ t64  # (n,r,r)
            err = torch.linalg.matrix_norm(gram - torch.eye(r, dtype=torch.float64)).max().item()
            if err > ORTHONORMAL_TOL:
                raise _fail(source, f"{key}.{name}", f"columns not orthonormal (‖UᵀU − I‖ = {err:.3g} > {ORTHONORMAL_TOL})")
            continue
        norms = torch.linalg.matrix_norm(t64)  # (n,)
        if bool((norms > MAX_GENERATOR_NORM).any()):
            raise _fail(source, f"{key}.{name}", f"generator norm ‖A‖ = {norms.max().item():.3g} exceeds "
                        f"{MAX_GENERATOR_NORM:g} (rotation angles are periodic; this is a diverged or damaged generator)")
        err = torch.linalg.matrix_norm(t64 + t64.transpose(-1, -2))  # (n,)
        if bool((err > SKEW_RTOL * (1.0 + norms)).any()):
            raise _fail(source, f"{key}.{name}", f"not skew-symmetric (‖A + Aᵀ‖ = {err.max().item():.3g})")
        if for_file and not bool(t64.any()):
            raise _fail(source, f"{key}.{name}", "generator is exactly zero (it would protect nothing)")


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
        order = {k: i for i, k in enumerate(meta.family.kind_names)}
        self.blocks: dict[tuple[str, int], BlockAdapter] = {}
        for b in sorted(blocks, key=lambda b: (order.get(b.kind, len(order)), b.kind, b.index)):
            if (b.kind, b.index) in self.blocks:
                raise _fail(source, b.key, "block given twice")
            b.kv_group = meta.kv_group
            self.blocks[(b.kind, b.index)] = b
        if validate:
            self.validate()

    # -- validation and compatibility -------------------------------------------------------
    def validate(self, *, for_file: bool = False) -> None:
        """Check every rule of the format; raises :class:`AdapterFormatError`.

        ``for_file`` adds the rules for a finished adapter (no exactly-zero generator): an
        adapter being trained starts from zero generators, one written to a file must not.
        """
        if not self.blocks:
            raise _fail(self.source, "tensors", "adapter patches no block")
        for b in self.blocks.values():
            _check_block(b, self.meta, self.source, for_file=for_file)

    def check_compatible(self, shapes: ModelShapes) -> None:
        """Raise :class:`IncompatibleAdapterError` unless the model is of this family with these shapes."""
        m = self.meta
        name = f"adapter {self.source!r}" if self.source else "adapter"
        built = f"built for {m.family.label()}{f', base model {m.base_model!r}' if m.base_model else ''}"
        if shapes.arch != m.arch:
            try:
                other = archs.get(shapes.arch).label()
            except KeyError:
                other = repr(shapes.arch)
            raise IncompatibleAdapterError(f"{name} was {built} and cannot protect a {other} model "
                                           "(families differ even where head and block counts agree)")
        diffs = [f"{label}: adapter {a}, model {b}" for label, a, b in (
            ("num_heads", m.num_heads, shapes.num_heads), ("head_dim", m.head_dim, shapes.head_dim),
            ("num_kv_heads", m.num_kv_heads or m.num_heads, shapes.num_kv_heads or shapes.num_heads))
            if a != b]
        diffs += [f"{kind} blocks: adapter {m.num_blocks(kind)}, model {shapes.blocks.get(kind, 0)}"
                  for kind in m.family.kind_names if m.num_blocks(kind) != shapes.blocks.get(kind, 0)]
        if diffs:
            raise IncompatibleAdapterError(f"{name} ({built}) does not fit this model — " + "; ".join(diffs))

    # -- access ----------------------------------------------------------------------------
    @property
    def arch(self) -> archs.Arch:
        return self.meta.family

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
            "source": self.source, "arch": m.arch, "family": m.family.name, "base_model": m.base_model,
            "concepts": list(m.concepts), "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads,
            "head_dim": m.head_dim, "blocks_in_model": dict(m.blocks), "rank": m.rank, "threshold": m.threshold,
            "num_blocks_patched": len(self.blocks),
            "num_heads_patched": sum(b.heads.numel() for b in self.blocks.values()),
            "num_parameters": self.num_parameters(), "config": dict(m.config) if m.config else None,
            "blocks": blocks,
        }

    def __repr__(self) -> str:
        m = self.meta
        return (f"SafeRoPEAdapter(arch={m.arch!r}, concepts={list(m.concepts)}, rank={m.rank}, blocks={len(self.blocks)}, "
                f"heads={sum(b.heads.numel() for b in self.blocks.values())}, threshold={m.threshold}, "
                f"source={self.source!r})")

    # -- application ----------------------------------------------------------------------
    def _block_for(self, kind: str, index: int, x: Tensor, which: str) -> BlockAdapter | None:
        want = self.meta.num_heads if which == "q" else (self.meta.num_kv_heads or self.meta.num_heads)
        if x.ndim != 4 or x.shape[1] != want or x.shape[-1] != self.meta.head_dim:
            raise IncompatibleAdapterError(
                f"adapter {self.source or ''} expects {which} of {want} heads × {self.meta.head_dim}, "
                f"got shape {tuple(x.shape)} in {kind} block {index}")
        return self.block(kind, index)

    def apply_qk(self, kind: str, index: int, q: Tensor, k: Tensor, *, txt_len: int, img_first: bool = False,
                 strength: float = 1.0, threshold: float | None = None, return_risk: bool = False,
                 inplace: bool = False):
        """Apply this adapter's block ``(kind, index)`` to ``(B, H, L, D)`` queries and keys.

        Blocks the adapter does not patch come back untouched (same objects). See
        :func:`~saferope_engine.core.saferope_qk` for the arguments.
        """
        from .core import saferope_qk  # local: core imports this module

        block = self._block_for(kind, index, q, "q")
        self._block_for(kind, index, k, "k")
        tau = self.meta.threshold if threshold is None else threshold
        if block is None:
            return (q, k, None) if return_risk else (q, k)
        return saferope_qk(q, k, block, txt_len=txt_len, img_first=img_first, strength=strength, threshold=tau,
                           return_risk=return_risk, inplace=inplace)

    def apply(self, kind: str, index: int, which: str, x: Tensor, *, txt_len: int, img_first: bool = False,
              strength: float = 1.0, threshold: float | None = None, return_risk: bool = False,
              inplace: bool = False):
        """Apply block ``(kind, index)`` to queries (``which="q"``) or keys (``"k"``) alone.

        For hosts whose QK-norm normalises q and k in separate modules. Returns ``x'``, or with
        ``return_risk`` ``(x', (rho, gate))`` — ``(B, n, L)`` each, ``None`` for blocks the adapter
        does not patch; see :func:`~saferope_engine.core.saferope_x`.
        """
        from .core import saferope_x

        block = self._block_for(kind, index, x, which)
        tau = self.meta.threshold if threshold is None else threshold
        if block is None:
            return (x, None) if return_risk else x
        out = saferope_x(x, block, which, txt_len=txt_len, img_first=img_first, strength=strength, threshold=tau,
                         return_risk=return_risk, inplace=inplace)
        return (out[0], out[1:]) if return_risk else out

    # -- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {name: t.detach().to("cpu").contiguous() for b in self.blocks.values() for name, t in b.tensors()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write format v2 atomically (a temporary file renamed into place). Returns the path."""
        from safetensors.torch import save_file

        self.validate(for_file=True)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = self.state_dict()
        header = {**self.meta.to_header(), "content_sha256": content_sha256(tensors)}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=header)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        logger.info("saved SafeRoPE adapter to %s (%s, %d blocks)", path, self.meta.arch, len(self.blocks))
        return path

    @classmethod
    def from_state(cls, tensors: Mapping[str, Tensor], header: Mapping[str, str] | None,
                   source: str | None = None) -> SafeRoPEAdapter:
        """Build and validate a finished adapter from a safetensors state dict and its header.

        Checks ``content_sha256`` when the header has one (format v2 writes it always).
        """
        meta = AdapterMeta.from_header(header, source)
        digest = (header or {}).get("content_sha256")
        if digest is not None:
            try:
                actual = content_sha256(tensors)
            except AdapterFormatError as e:
                raise _fail(source, "tensors", str(e)) from None
            if actual != digest:
                raise _fail(source, "content_sha256", "the tensors do not match the checksum written at export "
                            "(the file was modified or damaged after it was saved)")
        grouped: dict[tuple[str, int], dict[str, Tensor]] = {}
        for name in tensors:
            m = _TENSOR_RE.match(name)
            if not m or m.group(1) not in meta.family.kind_names:
                raise _fail(source, f"tensor {name[:80]!r}", f"unknown tensor name (kinds of {meta.family.name}: "
                            f"{', '.join(meta.family.kind_names)})")
            grouped.setdefault((m.group(1), int(m.group(2))), {})[m.group(3)] = tensors[name]
        blocks = []
        for (kind, index), parts in grouped.items():
            for req in ("heads", "U_q", "U_k"):
                if req not in parts:
                    raise _fail(source, f"{kind}.{index}.{req}", "missing")
            blocks.append(BlockAdapter(kind, index, parts["heads"], parts["U_q"], parts["U_k"],
                                       parts.get("A_txt"), parts.get("A_img")))
        adapter = cls(meta, blocks, source=source, validate=False)
        adapter.validate(for_file=True)
        return adapter


def _describe_missing(path: Path) -> str:
    if path.is_symlink():
        return f"a broken symbolic link (to {os.readlink(path)!r}, which does not exist)"
    if path.exists():
        return "not a regular file"
    return "not found"


def load_adapter(path: str | os.PathLike) -> SafeRoPEAdapter:
    """Read and validate an adapter file (v1 or v2). Raises :class:`AdapterFormatError` naming the file."""
    from safetensors import safe_open

    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise _fail(source, "file", _describe_missing(path))
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata()
            names = list(f.keys())
            # Validate the header and the names before reading any tensor data.
            meta = AdapterMeta.from_header(header, source)
            for name in names:
                m = _TENSOR_RE.match(name)
                if not m or m.group(1) not in meta.family.kind_names:
                    raise _fail(source, f"tensor {name[:80]!r}", "unknown tensor name")
            tensors = {name: f.get_tensor(name) for name in names}
    except AdapterFormatError:
        raise
    except Exception as e:  # safetensors raises several types for truncated/corrupt files
        raise _fail(source, "file", f"not a readable safetensors file ({type(e).__name__}: {str(e)[:200]})") from None
    return SafeRoPEAdapter.from_state(tensors, header, source)
