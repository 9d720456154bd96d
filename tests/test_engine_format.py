"""Adapter file format v2 (design §4, §8), v1 still read: round trip, every validation rule, hardening, fuzzing."""

from __future__ import annotations

import json
import random
import struct
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from saferope_engine import (
    AdapterFormatError,
    AdapterMeta,
    IncompatibleAdapterError,
    ModelShapes,
    SafeRoPEAdapter,
    SafeRoPEError,
    content_sha256,
    load_adapter,
)
from saferope_engine.adapter import MAX_GENERATOR_NORM
from saferope_engine.testing import random_adapter

SHAPES = dict(num_heads=4, head_dim=16, model_blocks={"double": 3, "single": 2})
MODEL = ModelShapes(arch="flux1", num_heads=4, head_dim=16, blocks={"double": 3, "single": 2})


@pytest.fixture
def adapter():
    return random_adapter(**SHAPES, rank=3, blocks=[("double", 0), ("double", 2), ("single", 1)], heads=[1, 3],
                          threshold=0.4, concepts=("nudity", "violence"))


@pytest.fixture
def saved(adapter, tmp_path):
    path = tmp_path / "a.safetensors"
    adapter.save(path)
    return path


def header_of(path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def rewrite(path, tensors=None, metadata=None, rehash=True):
    """Re-save `path` with modified tensors/metadata (bypassing the engine's own checks).

    ``rehash`` writes the checksum of the modified tensors, so the structural checks are what fails.
    """
    meta = header_of(path)
    ts = load_file(str(path))
    if tensors is not None:
        ts = tensors(ts)
        if rehash and "content_sha256" in meta:
            meta["content_sha256"] = content_sha256(ts)
    if metadata is not None:
        meta = metadata(meta)
    save_file(ts, str(path), metadata=meta)
    return path


def test_round_trip_is_exact_and_writes_v2_with_checksum(adapter, saved):
    loaded = load_adapter(saved)
    assert loaded.meta == AdapterMeta(**{**adapter.meta.__dict__, "config": None})
    assert loaded.block_keys() == adapter.block_keys()
    for key, b in adapter.blocks.items():
        lb = loaded.blocks[key]
        for name in ("heads", "U_q", "U_k", "A_txt", "A_img"):
            assert torch.equal(getattr(b, name), getattr(lb, name)), (key, name)
    assert loaded.source == str(saved)
    assert loaded.summary()["num_heads_patched"] == 6 and loaded.summary()["family"] == "FLUX.1"
    h = header_of(saved)
    assert h["format_version"] == "2" and h["arch"] == "flux1" and json.loads(h["blocks"]) == {"double": 3, "single": 2}
    assert h["content_sha256"] == content_sha256(load_file(str(saved)))
    assert "num_double_blocks" not in h


def test_checksum_follows_the_documented_byte_layout():
    """design §8: name, dtype as safetensors spells it, compact JSON shape, little-endian bytes; sorted by name."""
    import hashlib

    ts = {"b.0.heads": torch.tensor([1, 2]), "a.0.U_q": torch.ones(1, 2, 1)}
    h = hashlib.sha256()
    h.update(b"a.0.U_q" + b"F32" + b"[1,2,1]" + struct.pack("<2f", 1.0, 1.0))
    h.update(b"b.0.heads" + b"I64" + b"[2]" + struct.pack("<2q", 1, 2))
    assert content_sha256(ts) == h.hexdigest()


def test_v1_files_still_load_as_flux1(adapter, tmp_path):
    """A file written by format v1 (arch=flux, block counts as keys, no checksum)."""
    p = tmp_path / "v1.safetensors"
    h = adapter.meta.to_header()
    v1 = {k: v for k, v in h.items() if k != "blocks"}
    v1.update(format_version="1", arch="flux", num_double_blocks="3", num_single_blocks="2")
    save_file(adapter.state_dict(), str(p), metadata=v1)
    a = load_adapter(p)
    assert a.meta.arch == "flux1" and dict(a.meta.blocks) == {"double": 3, "single": 2}
    a.check_compatible(MODEL)


def test_round_trip_keeps_config_and_optional_generators(tmp_path):
    a = random_adapter(**SHAPES, rank=2, blocks=[("single", 0)], segments=("img",))
    a = SafeRoPEAdapter(AdapterMeta(**{**a.meta.__dict__, "config": {"steps": 3, "prompts": ["x"]}}),
                        list(a.blocks.values()))
    a.save(tmp_path / "b.safetensors")
    b = load_adapter(tmp_path / "b.safetensors")
    assert b.meta.config == {"steps": 3, "prompts": ["x"]}
    assert b.block("single", 0).A_txt is None and b.block("single", 0).A_img is not None


def test_grouped_query_keys_round_trip(tmp_path):
    """Z-Image keys may have fewer heads: U_k rows belong to the key heads heads // group."""
    a = random_adapter(num_heads=4, head_dim=16, num_kv_heads=2, arch="z_image",
                       model_blocks={"context_refiner": 1, "noise_refiner": 1, "main": 2}, rank=2, heads=[0, 1, 3])
    b = a.block("main", 0)
    assert b.k_heads.tolist() == [0, 1] and b.k_rows.tolist() == [0, 2] and b.U_k.shape == (2, 16, 2)
    assert a.block("context_refiner", 0).A_img is None and a.block("noise_refiner", 0).A_txt is None
    a.save(tmp_path / "z.safetensors")
    z = load_adapter(tmp_path / "z.safetensors")
    assert z.meta.num_kv_heads == 2 and header_of(tmp_path / "z.safetensors")["num_kv_heads"] == "2"


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


def _bump(t):  # one entry of a skew matrix and its mirror, keeping it skew
    t = t.clone()
    t[0, 0, 1] = 1.7e38
    t[0, 1, 0] = -1.7e38
    return t


BAD_TENSORS = [
    ("wrong dtype", _set("double.0.U_q", lambda t: t.double()), "double.0.U_q.*dtype"),
    ("wrong heads dtype", _set("double.0.heads", lambda t: t.int()), "double.0.heads.*int64"),
    ("wrong shape", _set("double.0.U_k", lambda t: t[:, :, :2].contiguous()), "double.0.U_k.*shape"),
    ("NaN", _set("single.1.A_txt", _nan), "single.1.A_txt.*NaN"),
    ("inf", _set("double.2.U_q", lambda t: t.masked_fill(torch.ones_like(t, dtype=torch.bool), float("inf"))),
     "double.2.U_q.*NaN or infinite"),
    ("non-orthonormal U", _set("double.0.U_q", lambda t: t * 1.01), "double.0.U_q.*orthonormal"),
    ("non-skew A", _set("double.2.A_img", lambda t: t + 0.1 * torch.eye(t.shape[-1])), "double.2.A_img.*skew"),
    ("zero generator", _set("double.0.A_txt", torch.zeros_like), "double.0.A_txt.*exactly zero"),
    ("huge generator", _set("double.0.A_txt", _bump), "double.0.A_txt.*exceeds"),
    ("generator above the bound", _set("double.0.A_txt", lambda t: t / torch.linalg.matrix_norm(t)[:, None, None]
                                       * (MAX_GENERATOR_NORM * 1.01)), "double.0.A_txt.*exceeds 256"),
    ("duplicate heads", _set("double.0.heads", lambda t: torch.tensor([1, 1])), "double.0.heads.*duplicate"),
    ("head out of range", _set("double.0.heads", lambda t: torch.tensor([1, 4])), "double.0.heads.*out of range"),
    ("negative head", _set("double.0.heads", lambda t: torch.tensor([-1, 2])), "double.0.heads.*out of range"),
    ("unknown tensor", lambda ts: {**ts, "double.0.bias": torch.zeros(2)}, "double.0.bias.*unknown tensor"),
    ("unknown tensor kind", lambda ts: {**ts, "triple.0.heads": torch.zeros(2)}, "triple.0.heads.*unknown"),
    ("other family's kind", lambda ts: {**ts, "main.0.heads": torch.zeros(2)}, "main.0.heads.*unknown"),
    ("block out of range", lambda ts: {k.replace("double.2.", "double.3."): v for k, v in ts.items()}, "double.3.*out of range"),
    ("non-canonical index", lambda ts: {k.replace("double.2.", "double.02."): v for k, v in ts.items()}, "double.02.*unknown"),
    ("5000-digit index", lambda ts: {k.replace("double.2.", "double." + "9" * 5000 + "."): v for k, v in ts.items()},
     "unknown tensor name"),
    ("missing U_k", _drop("single.1.U_k"), "single.1.U_k.*missing"),
    ("missing heads", _drop("double.0.heads"), "double.0.heads.*missing"),
    ("no generator", lambda ts: {k: v for k, v in ts.items() if not k.startswith("double.0.A_")}, "double.0.*neither"),
    ("empty heads", lambda ts: {**{k: v for k, v in ts.items() if not k.startswith("double.0.")},
                                 "double.0.heads": torch.zeros(0, dtype=torch.int64),
                                 "double.0.U_q": torch.zeros(0, 16, 3), "double.0.U_k": torch.zeros(0, 16, 3),
                                 "double.0.A_txt": torch.zeros(0, 3, 3)}, "double.0.heads.*n ≤ 4"),
    ("no blocks", lambda ts: {}, "patches no block"),
]


def _deep(n: int) -> str:
    return "[" * n + "]" * n


BAD_META = [
    ("no metadata", lambda m: {}, "metadata.*missing"),
    ("wrong format", lambda m: {**m, "format": "lora"}, "'format'"),
    ("future version", lambda m: {**m, "format_version": "3"}, "unsupported version '3'"),
    ("missing key", lambda m: {k: v for k, v in m.items() if k != "rank"}, r"missing keys \['rank'\]"),
    ("unknown key", lambda m: {**m, "foo": "1"}, r"unknown keys \['foo'\]"),
    ("bad integer", lambda m: {**m, "num_heads": "four"}, "'num_heads'.*not an integer"),
    ("absurd integer", lambda m: {**m, "num_heads": "99999999999999999999"}, "'num_heads'.*at most 9 digits"),
    ("too many heads", lambda m: {**m, "num_heads": "999999999"}, "num_heads.*4096"),
    ("bad threshold", lambda m: {**m, "threshold": "1.5"}, "threshold"),
    ("nan threshold", lambda m: {**m, "threshold": "nan"}, "threshold"),
    ("bad concepts", lambda m: {**m, "concepts": "nudity"}, "concepts"),
    ("concepts not list", lambda m: {**m, "concepts": '{"a": 1}'}, "concepts"),
    ("surrogate in concepts", lambda m: {**m, "concepts": '["\\ud800"]'}, "concepts.*surrogate"),
    ("NUL in base model", lambda m: {**m, "base_model": "flux\x00dev"}, "base_model.*NUL"),
    ("huge integer in JSON", lambda m: {**m, "saferope.config": '{"a": ' + "9" * 5000 + "}"}, "saferope.config.*digits"),
    ("100k-deep JSON", lambda m: {**m, "saferope.config": _deep(100_000)}, "saferope.config.*nested deeper"),
    ("NaN in config", lambda m: {**m, "saferope.config": '{"lr": NaN}'}, "saferope.config.*NaN is not JSON"),
    ("unknown arch", lambda m: {**m, "arch": "sd3"}, "arch.*unknown model family 'sd3'"),
    ("v1 arch", lambda m: {**m, "arch": "flux"}, "arch.*unknown model family 'flux'"),
    ("blocks missing a kind", lambda m: {**m, "blocks": '{"double": 3}'}, "blocks.*every FLUX.1 block kind"),
    ("blocks not an object", lambda m: {**m, "blocks": "[3, 2]"}, "blocks"),
    ("kv heads for FLUX", lambda m: {**m, "num_kv_heads": "2"}, "num_kv_heads.*as many heads"),
    ("bad checksum text", lambda m: {**m, "content_sha256": "XYZ"}, "content_sha256"),
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
    assert len(str(e.value)) < 2000  # a message, not a dump


def test_tensors_changed_after_export_are_rejected_by_the_checksum(saved):
    """Flipped low bits stay within every tolerance; only the checksum catches them."""
    def flip(ts):
        t = ts["double.0.U_q"].clone()
        t.view(torch.int32).view(-1)[5] ^= 1  # the lowest mantissa bit of one entry
        return {**ts, "double.0.U_q": t}

    rewrite(saved, tensors=flip, rehash=False)
    with pytest.raises(AdapterFormatError, match="content_sha256.*modified or damaged"):
        load_adapter(saved)


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
    link = tmp_path / "link.safetensors"
    link.symlink_to(tmp_path / "gone.safetensors")
    with pytest.raises(AdapterFormatError, match="broken symbolic link.*gone.safetensors"):
        load_adapter(link)


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


def _mutants(data: bytes, rng: random.Random):
    """Byte flips anywhere, and targeted edits of the JSON header (values, keys, numbers)."""
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + n].decode()
    while True:
        kind = rng.randrange(3)
        buf = bytearray(data)
        if kind == 0:
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            yield bytes(buf)
        else:
            h = list(header)
            pos = rng.randrange(len(h))
            h[pos] = rng.choice('0123456789"{}[],:.-eEaZ\\ ' if kind == 1 else "9")
            raw = "".join(h).encode()
            if len(raw) == n:
                yield data[:8] + raw + data[8 + n:]


def test_seeded_fuzz_only_raises_engine_errors(saved, tmp_path):
    """Hundreds of mutated files, seconds: every outcome is a valid adapter or an engine error."""
    rng = random.Random(1234)
    data = saved.read_bytes()
    outcomes = {"ok": 0, "rejected": 0}
    t0 = time.perf_counter()
    for i, buf in zip(range(600), _mutants(data, rng)):
        p = tmp_path / f"fuzz{i % 4}.safetensors"
        p.write_bytes(buf)
        try:
            a = load_adapter(p)
        except SafeRoPEError:
            outcomes["rejected"] += 1
        else:
            a.validate(for_file=True)  # anything accepted must be a valid adapter
            outcomes["ok"] += 1
    assert outcomes["rejected"] > 300  # the fuzzer does hit the checks
    assert time.perf_counter() - t0 < 120  # no mutation makes loading hang


def test_check_compatible_names_every_mismatch(adapter):
    adapter.check_compatible(MODEL)
    with pytest.raises(IncompatibleAdapterError, match="num_heads: adapter 4, model 24.*head_dim: adapter 16, model 128"):
        adapter.check_compatible(ModelShapes("flux1", 24, 128, {"double": 3, "single": 2}))
    with pytest.raises(IncompatibleAdapterError, match="single blocks: adapter 2, model 38"):
        adapter.check_compatible(ModelShapes("flux1", 4, 16, {"double": 3, "single": 38}))


def test_an_adapter_of_another_family_is_refused_even_with_equal_shapes(adapter):
    with pytest.raises(IncompatibleAdapterError, match=r"built for FLUX.1 \(flux1\).*cannot protect a Flux.2 \(flux2\)"):
        adapter.check_compatible(ModelShapes("flux2", 4, 16, {"double": 3, "single": 2}))


def test_apply_qk_rejects_wrong_head_layout(adapter):
    q = torch.randn(1, 3, 5, 16)
    with pytest.raises(IncompatibleAdapterError, match="expects q of 4 heads × 16"):
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
        AdapterMeta(num_heads=1, head_dim=4, blocks={"double": 1, "single": 0}, rank=2, threshold=1.0)
    with pytest.raises(AdapterFormatError, match="arch.*unknown model family"):
        AdapterMeta(num_heads=1, head_dim=4, blocks={"double": 1}, rank=2, arch="hidream")


def test_zero_generators_are_fine_in_memory_but_never_written(tmp_path):
    """Training starts from zero generators (identity); a file of them would protect nothing."""
    a = random_adapter(**SHAPES, rank=2, blocks=[("double", 0)])
    a.block("double", 0).A_txt.zero_()
    a.validate()
    with pytest.raises(AdapterFormatError, match="exactly zero"):
        a.save(tmp_path / "z.safetensors")
    assert not list(tmp_path.iterdir())
