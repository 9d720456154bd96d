"""Adapter file format v1 (design §4): round trip, every validation rule, fuzzing."""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from saferope_engine import (AdapterFormatError, AdapterMeta, IncompatibleAdapterError, SafeRoPEAdapter,
                             SafeRoPEError, load_adapter)
from saferope_engine.testing import random_adapter

SHAPES = dict(num_heads=4, head_dim=16, num_double_blocks=3, num_single_blocks=2)


@pytest.fixture
def adapter():
    return random_adapter(**SHAPES, rank=3, blocks=[("double", 0), ("double", 2), ("single", 1)], heads=[1, 3],
                          threshold=0.4, concepts=("nudity", "violence"))


@pytest.fixture
def saved(adapter, tmp_path):
    path = tmp_path / "a.safetensors"
    adapter.save(path)
    return path


def rewrite(path, tensors=None, metadata=None):
    """Re-save `path` with modified tensors/metadata (bypassing the engine's own checks)."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    ts = load_file(str(path))
    if tensors is not None:
        ts = tensors(ts)
    if metadata is not None:
        meta = metadata(meta)
    save_file(ts, str(path), metadata=meta)
    return path


def test_round_trip_is_exact(adapter, saved):
    loaded = load_adapter(saved)
    assert loaded.meta == AdapterMeta(**{**adapter.meta.__dict__, "config": None})
    assert loaded.block_keys() == adapter.block_keys()
    for key, b in adapter.blocks.items():
        lb = loaded.blocks[key]
        for name in ("heads", "U_q", "U_k", "A_txt", "A_img"):
            assert torch.equal(getattr(b, name), getattr(lb, name)), (key, name)
    assert loaded.source == str(saved)
    assert loaded.summary()["num_heads_patched"] == 6


def test_round_trip_keeps_config_and_optional_generators(tmp_path):
    a = random_adapter(**SHAPES, rank=2, blocks=[("single", 0)], segments=("img",))
    a = SafeRoPEAdapter(AdapterMeta(**{**a.meta.__dict__, "config": {"steps": 3, "prompts": ["x"]}}),
                        list(a.blocks.values()))
    a.save(tmp_path / "b.safetensors")
    b = load_adapter(tmp_path / "b.safetensors")
    assert b.meta.config == {"steps": 3, "prompts": ["x"]}
    assert b.block("single", 0).A_txt is None and b.block("single", 0).A_img is not None


def test_save_is_atomic_and_leaves_no_temp_files(adapter, tmp_path):
    adapter.save(tmp_path / "x.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def _drop(name):
    return lambda ts: {k: v for k, v in ts.items() if k != name}


def _set(name, fn):
    return lambda ts: {**ts, name: fn(ts[name])}


def _nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


BAD_TENSORS = [
    ("wrong dtype", _set("double.0.U_q", lambda t: t.double()), "double.0.U_q.*dtype"),
    ("wrong heads dtype", _set("double.0.heads", lambda t: t.int()), "double.0.heads.*int64"),
    ("wrong shape", _set("double.0.U_k", lambda t: t[:, :, :2].contiguous()), "double.0.U_k.*shape"),
    ("NaN", _set("single.1.A_txt", _nan), "single.1.A_txt.*NaN"),
    ("inf", _set("double.2.U_q", lambda t: t.masked_fill(torch.ones_like(t, dtype=torch.bool), float("inf"))), "double.2.U_q.*NaN or infinite"),
    ("non-orthonormal U", _set("double.0.U_q", lambda t: t * 1.01), "double.0.U_q.*orthonormal"),
    ("non-skew A", _set("double.2.A_img", lambda t: t + 0.1 * torch.eye(t.shape[-1])), "double.2.A_img.*skew"),
    ("duplicate heads", _set("double.0.heads", lambda t: torch.tensor([1, 1])), "double.0.heads.*duplicate"),
    ("head out of range", _set("double.0.heads", lambda t: torch.tensor([1, 4])), "double.0.heads.*out of range"),
    ("negative head", _set("double.0.heads", lambda t: torch.tensor([-1, 2])), "double.0.heads.*out of range"),
    ("unknown tensor", lambda ts: {**ts, "double.0.bias": torch.zeros(2)}, "double.0.bias.*unknown tensor"),
    ("unknown tensor kind", lambda ts: {**ts, "triple.0.heads": torch.zeros(2)}, "triple.0.heads.*unknown"),
    ("block out of range", lambda ts: {k.replace("double.2.", "double.3."): v for k, v in ts.items()}, "double.3.*out of range"),
    ("non-canonical index", lambda ts: {k.replace("double.2.", "double.02."): v for k, v in ts.items()}, "double.02.*unknown"),
    ("missing U_k", _drop("single.1.U_k"), "single.1.U_k.*missing"),
    ("missing heads", _drop("double.0.heads"), "double.0.heads.*missing"),
    ("no generator", lambda ts: {k: v for k, v in ts.items() if not k.startswith("double.0.A_")}, "double.0.*neither"),
    ("empty heads", lambda ts: {**{k: v for k, v in ts.items() if not k.startswith("double.0.")},
                                 "double.0.heads": torch.zeros(0, dtype=torch.int64),
                                 "double.0.U_q": torch.zeros(0, 16, 3), "double.0.U_k": torch.zeros(0, 16, 3),
                                 "double.0.A_txt": torch.zeros(0, 3, 3)}, "double.0.heads.*n ≥ 1"),
    ("no blocks", lambda ts: {}, "patches no block"),
]


BAD_META = [
    ("no metadata", lambda m: {}, "metadata.*missing"),
    ("wrong format", lambda m: {**m, "format": "lora"}, "'format'"),
    ("future version", lambda m: {**m, "format_version": "2"}, "unsupported version '2'"),
    ("missing key", lambda m: {k: v for k, v in m.items() if k != "rank"}, r"missing keys \['rank'\]"),
    ("unknown key", lambda m: {**m, "foo": "1"}, r"unknown keys \['foo'\]"),
    ("bad integer", lambda m: {**m, "num_heads": "four"}, "'num_heads'.*not an integer"),
    ("bad threshold", lambda m: {**m, "threshold": "1.5"}, "threshold"),
    ("nan threshold", lambda m: {**m, "threshold": "nan"}, "threshold"),
    ("bad concepts", lambda m: {**m, "concepts": "nudity"}, "concepts"),
    ("concepts not list", lambda m: {**m, "concepts": '{"a": 1}'}, "concepts"),
    ("wrong arch", lambda m: {**m, "arch": "sd3"}, "arch"),
    ("rank above head_dim", lambda m: {**m, "rank": "17"}, "rank"),
    ("bad config", lambda m: {**m, "saferope.config": "{oops"}, "saferope.config"),
    ("heads mismatch", lambda m: {**m, "num_heads": "2"}, "heads.*out of range"),
    ("rank mismatch", lambda m: {**m, "rank": "2"}, "shape"),
]


BAD_FILES = [("tensors", *b) for b in BAD_TENSORS] + [("metadata", *b) for b in BAD_META]


@pytest.mark.parametrize("part,label,mutate,pattern", BAD_FILES, ids=[f"{b[0]}: {b[1]}" for b in BAD_FILES])
def test_malformed_files_are_rejected_with_the_file_named(saved, part, label, mutate, pattern):
    rewrite(saved, **{part: mutate})
    with pytest.raises(AdapterFormatError, match=pattern) as e:
        load_adapter(saved)
    assert str(saved) in str(e.value)


def test_truncated_and_garbage_files(saved, tmp_path):
    data = saved.read_bytes()
    for cut in (0, 4, 8, 20, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(data[:cut])
        with pytest.raises(AdapterFormatError, match=str(p)):
            load_adapter(p)
    p = tmp_path / "pickle.safetensors"
    p.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle header: must not be unpickled
    with pytest.raises(AdapterFormatError, match="not a readable safetensors"):
        load_adapter(p)
    with pytest.raises(AdapterFormatError, match="not found"):
        load_adapter(tmp_path / "missing.safetensors")
    with pytest.raises(AdapterFormatError, match="not a regular file"):
        load_adapter(tmp_path)


def test_header_claiming_huge_tensor_is_rejected(saved, tmp_path):
    data = saved.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [10**9, 10**6]
    raw = json.dumps(header).encode()
    p = tmp_path / "huge.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(AdapterFormatError):
        load_adapter(p)


def test_fuzz_random_byte_flips_only_raise_engine_errors(saved, tmp_path):
    rng = random.Random(1234)
    data = bytearray(saved.read_bytes())
    outcomes = {"ok": 0, "rejected": 0}
    for i in range(300):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        p = tmp_path / f"fuzz{i % 4}.safetensors"
        p.write_bytes(bytes(buf))
        try:
            a = load_adapter(p)
        except SafeRoPEError:
            outcomes["rejected"] += 1
        else:
            a.validate()  # anything accepted must be a valid adapter
            outcomes["ok"] += 1
    assert outcomes["rejected"] > 50  # the fuzzer does hit the checks


def test_check_compatible_names_every_mismatch(adapter):
    adapter.check_compatible(**SHAPES)
    with pytest.raises(IncompatibleAdapterError, match="num_heads: adapter 4, model 24.*head_dim: adapter 16, model 128"):
        adapter.check_compatible(num_heads=24, head_dim=128, num_double_blocks=3, num_single_blocks=2)
    with pytest.raises(IncompatibleAdapterError, match="num_single_blocks: adapter 2, model 38"):
        adapter.check_compatible(num_heads=4, head_dim=16, num_double_blocks=3, num_single_blocks=38)


def test_apply_qk_rejects_wrong_head_layout(adapter):
    q = torch.randn(1, 3, 5, 16)
    with pytest.raises(IncompatibleAdapterError, match="expects 4 heads × 16"):
        adapter.apply_qk("double", 0, q, q, txt_len=2)
    q = torch.randn(1, 4, 5, 16)
    out = adapter.apply_qk("double", 1, q, q, txt_len=2)  # block not in the adapter
    assert out[0] is q and out[1] is q


def test_in_memory_construction_is_validated():
    a = random_adapter(**SHAPES, rank=2, blocks=[("double", 0)])
    b = a.block("double", 0)
    b.U_q = b.U_q * 2
    with pytest.raises(AdapterFormatError, match="double.0.U_q.*orthonormal"):
        SafeRoPEAdapter(a.meta, [b])
    with pytest.raises(AdapterFormatError, match="threshold"):
        AdapterMeta(num_heads=1, head_dim=4, num_double_blocks=1, num_single_blocks=0, rank=2, threshold=1.0)
