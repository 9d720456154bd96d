"""The fused inference path (issue #12): operation budget, torch.compile, no host synchronisation.

Op counts are deterministic (counted by ``benchmarks/op_count.py`` with torch.profiler), so they
are asserted; timings are not (``benchmarks/engine_overhead.py`` prints them).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from saferope_engine import BlockAdapter, core, saferope_qk
from saferope_engine.testing import random_orthonormal, random_skew

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import op_count  # noqa: E402

#: The budget of issue #12 per patched block call, q and k together, dense path.
MAX_COMPUTING, MAX_TOP_LEVEL = 16, 40


def make_block(heads: list[int], D: int = 16, r: int = 5, *, kv_group: int = 1, seed: int = 0,
               segments=("txt", "img")) -> BlockAdapter:
    g = torch.Generator().manual_seed(seed)
    n = len(heads)
    n_k = len({h // kv_group for h in heads})
    return BlockAdapter("single", 0, torch.tensor(heads), random_orthonormal(n, D, r, generator=g),
                        random_orthonormal(n_k, D, r, generator=g),
                        random_skew(n, r, scale=0.7, generator=g) if "txt" in segments else None,
                        random_skew(n, r, scale=0.7, generator=g) if "img" in segments else None, kv_group=kv_group)


def risky(B: int, H: int, L: int, D: int = 16, *, seed: int = 1, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, L, D, generator=g).to(device, dtype), torch.randn(B, H, L, D, generator=g).to(device, dtype))


# -- operation budget ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def counts():
    with torch.inference_mode():
        return op_count.measure(op_count.PRESETS["small"])


@pytest.mark.parametrize("case", ["qk_device", "qk_device_bf16", "qk_cpu"])
def test_dense_qk_call_stays_within_the_operation_budget(counts, case):
    """Every head, rank 5, both segments, every token gated: ≤ 16 computing and ≤ 40 top-level aten ops."""
    c = counts[case]
    assert c["computing"] <= MAX_COMPUTING and c["top_level"] <= MAX_TOP_LEVEL, c
    names = c["computing_ops"]
    assert names.get("stack") == 1 and names.get("baddbmm", 0) + names.get("baddbmm_", 0) == 1, c  # q and k in one pass


def test_other_paths_stay_small(counts):
    assert counts["x_device"]["computing"] <= 13 and counts["x_device_inplace"]["computing"] <= 13, counts
    assert counts["qk_device_subset"]["computing"] <= MAX_COMPUTING, counts["qk_device_subset"]
    assert counts["qk_cpu_none_gated"]["computing"] <= 10, counts["qk_cpu_none_gated"]  # risk only, then the inputs
    assert counts["qk_cpu_few_gated"]["computing"] <= 24, counts["qk_cpu_few_gated"]
    assert "nonzero_numpy" not in counts["qk_device"]["computing_ops"]  # the device path reads nothing back


def test_op_counter_counts_views_as_metadata_and_copies_as_computing():
    x = torch.randn(2, 3, 4)
    c = op_count.count_ops(lambda: (x.unsqueeze(0).transpose(0, 1).reshape(2, 12), x.transpose(0, 1).reshape(-1)))
    assert c.top_level == 5 and c.computing == 1, c  # the second reshape copies; views are free
    c = op_count.count_ops(lambda: (x.to(torch.float32), x.to(torch.float64)))
    assert c.top_level == 2 and c.computing == 1, c  # a cast computes, a no-op `to` does not


# -- torch.compile --------------------------------------------------------------------------------------

def test_fused_dense_compiles_without_graph_break_and_equals_eager():
    torch._dynamo.reset()
    block = make_block([0, 2], seed=3)
    q, k = risky(1, 3, 20, seed=4)
    ops = core.dense_operators(block, q, txt_len=6)

    def step(q, k):
        return core.fused_dense(torch.stack((q, k)), ops, 0.2)

    with torch.no_grad():
        eager = step(q, k)
        compiled = torch.compile(step, fullgraph=True)(q, k)  # fullgraph: a graph break raises
    assert eager[2].any() and not eager[2].all()  # some tokens gated, some not
    assert (compiled[0] - eager[0]).abs().max() <= 1e-5
    assert torch.equal(compiled[2], eager[2])
    assert torch.equal(compiled[0][:, :, 1], torch.stack((q, k))[:, :, 1])  # head 1 is not selected


def test_the_public_call_compiles_whole_with_its_cache_lookup():
    """``saferope_qk`` itself traces with fullgraph (cache lookup included), on the CPU's default settings."""
    torch._dynamo.reset()
    block = make_block([0, 1, 2], seed=5, segments=("txt",))
    q, k = risky(2, 3, 12, seed=6)
    call = lambda q, k: saferope_qk(q, k, block, txt_len=5, threshold=0.3)  # noqa: E731
    with torch.no_grad():
        eager = torch.stack(call(q, k))
        compiled = torch.stack(torch.compile(call, fullgraph=True)(q, k))
        assert (compiled - eager).abs().max() <= 1e-5 and not torch.equal(eager, torch.stack((q, k)))
        block.A_txt = block.A_txt * 2.0  # a reassigned generator: identity is guarded, the cache rebuilt
        again = torch.stack(torch.compile(call)(q, k))
        assert (again - torch.stack(call(q, k))).abs().max() <= 1e-5


# -- no host synchronisation -----------------------------------------------------------------------

_SYNCING = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "equal", "allclose",
            "_unique", "_unique2", "unique_dim", "unique_consecutive"}


class _NoHostReads(TorchDispatchMode):
    """Raises on any aten op that reads a non-CPU tensor back to the host (what would synchronise
    with a GPU); records the ops run on non-CPU tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.device_ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_device = [t for t in tensors if t.device.type != "cpu"]
        name = func.overloadpacket.__name__
        if on_device:
            self.device_ops.add(name)
            if name in _SYNCING:
                raise AssertionError(f"host read of a device tensor: aten.{name}")
            if name in ("_to_copy", "copy_", "to") and _to_host(func, args, kwargs):
                raise AssertionError(f"device-to-host copy: aten.{name}")
        return func(*args, **kwargs)


def _to_host(func, args, kwargs) -> bool:
    name = func.overloadpacket.__name__
    if name == "copy_":
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    dev = kwargs.get("device")
    return dev is not None and torch.device(dev).type == "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_path_never_reads_a_device_tensor_on_the_host(dtype):
    """Every inference entry point on the meta device (any non-CPU device takes the same path as CUDA),
    from a cold cache: joint q-k, one tensor in place, grouped-query keys, a head subset, risk maps."""
    mode = _NoHostReads()
    with torch.inference_mode(), mode:
        block = make_block([0, 1, 2], seed=7)
        q, k = risky(2, 3, 10, dtype=dtype, device="meta")
        q2, k2, risk = saferope_qk(q, k, block, txt_len=4, threshold=0.3, return_risk=True)
        assert q2.device.type == "meta" and q2.dtype == dtype and risk.rho_q.shape == (2, 3, 10)
        q3, k3 = saferope_qk(q, k, block, txt_len=4, threshold=0.3)
        x = core.saferope_x(q.clone(), block, "k", txt_len=4, threshold=0.3, inplace=True)
        sub = make_block([1], seed=8, segments=("txt",))
        saferope_qk(q, k, sub, txt_len=4, threshold=0.3)
        saferope_qk(q, k, sub, txt_len=4, threshold=0.3, return_risk=True)
        gqa = make_block([0, 1, 3], kv_group=2, seed=9)
        qg, kg = torch.empty(1, 4, 6, 16, device="meta", dtype=dtype), torch.empty(1, 2, 6, 16, device="meta", dtype=dtype)
        saferope_qk(qg, kg, gqa, txt_len=2, threshold=0.3)
    assert {q3.device.type, k3.device.type, x.device.type} == {"meta"}
    assert {"bmm", "baddbmm", "polar", "where", "index_select", "index_copy"} <= mode.device_ops, mode.device_ops


def test_the_sync_detector_catches_host_reads():
    x = torch.empty(3, device="meta")
    for read in (lambda: x.sum().item(), lambda: bool(x.any()), lambda: x.nonzero(), lambda: x.to("cpu")):
        with pytest.raises((AssertionError, NotImplementedError, RuntimeError)) as e, _NoHostReads():
            read()
        assert e.type is AssertionError, e.value


# -- memory layouts ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("segments", [("txt",), ("txt", "img")])
def test_transposed_inputs_give_the_contiguous_result_and_rotate_in_place(path, segments, monkeypatch):
    """diffusers hands over (B, L, H, D) memory seen as (B, H, L, D): with B > 1 and a partial span
    neither batched layout is a view; the result must not depend on the memory layout."""
    monkeypatch.setattr(core, "HOST_SHORTCUTS", path == "host")
    monkeypatch.setattr(core, "SPARSE_MAX_SHARE", 0.0)
    block = make_block([0, 1, 2], seed=11, segments=segments)
    g = torch.Generator().manual_seed(12)
    blhd = torch.randn(3, 10, 3, 16, generator=g)  # (B, L, H, D) memory
    x = blhd.transpose(1, 2)  # (B, H, L, D) view
    want = core.saferope_x(x.contiguous(), block, "q", txt_len=4, threshold=0.2)
    assert not torch.equal(want, x)
    with torch.inference_mode():
        got = core.saferope_x(x, block, "q", txt_len=4, threshold=0.2)
        assert torch.allclose(got, want, atol=1e-6) and torch.equal(x, blhd.transpose(1, 2))  # input untouched
        mine = blhd.clone()
        out = core.saferope_x(mine.transpose(1, 2), block, "q", txt_len=4, threshold=0.2, inplace=True)
        assert torch.allclose(out, want, atol=1e-6) and torch.allclose(mine.transpose(1, 2), want, atol=1e-6)
        q2, k2 = saferope_qk(x, x, block, txt_len=4, threshold=0.2)
        assert torch.allclose(q2, want, atol=1e-6)
