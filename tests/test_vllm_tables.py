"""The vLLM backend's op tables and slot bookkeeping, checked without an engine (fast logic tests).

The tables are what the patched decoder layers apply inside vLLM; here they are compiled from specs
and applied with the same function the layers use, against the spec's own ``apply`` in list order.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import workbench as wb
from workbench.engine.vllm.tables import Slots, pack_spec
from workbench.engine.vllm.shm import assemble
from workbench.opmath import apply_op_positions as apply_op_tables

H = 16


def _unpack(raw: bytes, m: int):
    flat = torch.frombuffer(bytearray(raw), dtype=torch.float32)
    return (flat[:m * H].view(m, H), flat[m * H:2 * m * H].view(m, H), flat[2 * m * H:].view(m, 3))


def _apply(h, tables, m):
    add, unit, par = _unpack(tables, m)
    n = h.shape[0]
    return apply_op_tables(h, add.expand(n, m, H), unit.expand(n, m, H), par.expand(n, m, 3))


def _op(kind, seed, a, b):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(H, generator=g)
    if kind == "add":
        return wb.AddSpec(v, scale=a)
    if kind == "cap":
        lo, hi = sorted((a, b))
        return wb.ProjectionCapSpec(v, min=lo, max=hi)
    if kind == "cap_max":
        return wb.ProjectionCapSpec(v, max=a)
    return wb.AblationSpec(v, scale=a)


ops = st.lists(st.tuples(st.sampled_from(["add", "cap", "cap_max", "ablate"]), st.integers(0, 10_000),
                         st.floats(-3, 3), st.floats(-3, 3)), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(ops=ops)
def test_tables_apply_the_ops_in_list_order(ops):
    op_list = [_op(*o) for o in ops]
    spec = wb.SteeringSpec(layers={2: wb.LayerSteeringSpec(operations=op_list)})
    h = torch.randn(5, H, generator=torch.Generator().manual_seed(1)) * 3
    expected = h
    for op in op_list:
        expected = op.apply(expected)
    m = 4
    got = _apply(h, pack_spec(spec, H, m)[2], m)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_an_add_and_a_projection_share_one_position_and_too_many_are_refused():
    v = torch.randn(H)
    fits = wb.SteeringSpec(layers={1: wb.LayerSteeringSpec(operations=[
        wb.AddSpec(v), wb.ProjectionCapSpec(v, max=1.0), wb.AddSpec(v), wb.AblationSpec(v, scale=0.0)])})
    assert set(pack_spec(fits, H, 2)) == {1}
    too_many = wb.SteeringSpec(layers={1: wb.LayerSteeringSpec(operations=[
        wb.ProjectionCapSpec(v, max=1.0), wb.AddSpec(v), wb.AddSpec(v)])})
    with pytest.raises(wb.ValidationError, match="max_ops_per_layer=3"):
        pack_spec(too_many, H, 2)


def test_an_unused_position_leaves_the_stream_bit_for_bit_unchanged():
    h = torch.randn(7, H) * 100
    empty = torch.zeros(7, 2, H)
    par = torch.tensor([-float("inf"), float("inf"), 0.0]).expand(7, 2, 3)
    assert torch.equal(apply_op_tables(h, empty, empty, par), h)


def test_slots_are_shared_by_equal_specs_reused_when_idle_and_exhausted_when_busy():
    slots = Slots(3)  # slot 0 reserved: two usable
    assert slots.acquire("a") == (1, True)
    assert slots.acquire("a") == (1, False)
    assert slots.acquire("b") == (2, True)
    assert slots.acquire("c") is None  # both busy: the request waits
    slots.release("a")
    assert slots.acquire("c") is None  # "a" still has one user
    slots.release("a")
    assert slots.acquire("c") == (1, True)  # "a" idle: its slot is rewritten
    assert slots.acquire("a") is None


def test_captured_chunks_assemble_by_position_and_a_gap_is_an_error():
    a, b = torch.ones(3, H), torch.full((2, H), 2.0)
    out = assemble([(0, a), (3, b), (3, b * 2)])  # a recomputed chunk (preemption) overwrites
    assert out.shape == (5, H) and float(out[4, 0]) == 4.0
    with pytest.raises(RuntimeError, match="missing position 3"):
        assemble([(0, a), (4, b)])


class _Layer:
    def __init__(self, rows: int):
        self.wb_cap = torch.randn(rows, H)


def _worker(tmp_path, kv):
    """A WorkbenchWorker's per-step state without vLLM: three layers, a KV cache, a fault counter file."""
    import types

    import numpy as np

    from workbench.engine.vllm.shm import FaultCounter
    from workbench.engine.vllm.worker import WorkbenchWorker

    counter = FaultCounter()
    w = object.__new__(WorkbenchWorker)
    w._wb_layers = [_Layer(8) for _ in range(3)]
    w._wb_store, w._wb_failed, w._wb_step, w._wb_check, w._wb_watched = {}, {}, [], None, []
    w._wb_counts = {"failed": 0, "kv_scrubs": 0}
    w._wb_faults = np.memmap(counter.path, dtype=np.int64, mode="r+", shape=(1,))
    w.model_runner = types.SimpleNamespace(kv_caches=kv)
    return w, counter


def test_a_non_finite_row_fails_its_request_alone_and_the_kv_cache_is_scrubbed(tmp_path):
    import numpy as np

    kv = [torch.randn(2, 4, 3), torch.randn(2, 4, 3)]
    kv[1][1, 2, 0] = float("nan")
    kv[0][0, 0, 1] = float("inf")
    clean = [t.nan_to_num(0.0, 0.0, 0.0) for t in kv]
    w, counter = _worker(tmp_path, [kv[0], (kv[1],)])
    try:
        w._wb_layers[-1].wb_cap[3, 5] = float("nan")  # token 3: the one token of request "b"
        w._wb_check = (["a", "b", "c"], np.array([3, 1, 2]))
        w._wb_after()
        assert w._wb_failed == {"b": ("nonfinite", "inf/NaN in the residual stream")}
        assert counter.moved() and not counter.moved()  # the kernel sees one bump, once
        assert all(torch.equal(t, c) for t, c in zip(kv, clean))  # NaN/inf zeroed, finite entries untouched
        assert w.wb_failures() == {"b": ("nonfinite", "inf/NaN in the residual stream")} and w.wb_failures() == {}
        w._wb_layers[-1].wb_cap[3, 5] = 0.0
        w._wb_check = (["a", "b", "c"], np.array([3, 1, 2]))
        w._wb_after()  # all finite: nothing reported, nothing scrubbed
        assert w._wb_failed == {} and w._wb_counts["kv_scrubs"] == 1 and not counter.moved()
    finally:
        counter.close()


def test_a_capture_copy_that_raises_fails_only_the_captured_requests_and_does_not_raise(tmp_path):
    w, counter = _worker(tmp_path, [])
    try:
        # (key, layers, offset, rows, start, request id): layer 7 does not exist, so the copy raises
        w._wb_step = [("k1", (1, 7), 0, 2, 0, "r1"), ("k2", (1, 7), 2, 3, 0, "r2")]
        w._wb_after()
        assert set(w._wb_failed) == {"r1", "r2"} and all(kind == "error" for kind, _ in w._wb_failed.values())
        assert "capturing failed" in w._wb_failed["r1"][1]
        assert w._wb_store == {} and counter.moved()
        w._wb_step = [("k3", (0, 2), 0, 2, 5, "r3")]  # the next step's copy works as before
        w._wb_after()
        assert torch.equal(w._wb_store["k3"][2][0][1], w._wb_layers[2].wb_cap[0:2])
        assert "r3" not in w._wb_failed
    finally:
        counter.close()


def test_the_vllm_plugin_imports_only_the_worker_half():
    """vLLM imports the entry point in every process: it must not pull in the engine, features or transformers."""
    import subprocess
    import sys

    code = ("import sys, workbench.engine.vllm.plugin as p, workbench.engine.vllm.worker; "
            "heavy = [m for m in ('transformers', 'workbench.engine.base', 'workbench.features', 'workbench.api', "
            "'workbench.engine.vllm.engine', 'pandas') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def test_vllm_versions_outside_the_tested_range_are_refused(monkeypatch):
    from workbench.engine.vllm import _compat

    monkeypatch.setattr(_compat, "version", lambda: "0.32.0+cpu")
    assert _compat.check_version() is None
    monkeypatch.setattr(_compat, "version", lambda: "0.40.1")
    monkeypatch.delenv("WORKBENCH_VLLM_ANY_VERSION", raising=False)
    with pytest.raises(wb.BackendUnavailableError, match="0.40.1.*tested range"):
        _compat.check_version()
    monkeypatch.setenv("WORKBENCH_VLLM_ANY_VERSION", "1")
    assert "0.40.1" in _compat.check_version()


def test_reference_ops_and_op_positions_share_one_math():
    """A cap and an ablation packed as op positions give the reference ops' result exactly."""
    g = torch.Generator().manual_seed(3)
    H = 16
    h = torch.randn(5, H, generator=g)
    v = torch.randn(H, generator=g)
    spec = wb.SteeringSpec({0: [wb.AddSpec(v, 0.5), wb.ProjectionCapSpec(v, min=-0.2, max=0.3), wb.AblationSpec(v, 0.25)]})
    want = spec.layers[0].apply(h)
    from workbench.engine.vllm.tables import unpack_slot

    [entry] = pack_spec(spec, hidden=H, max_ops=2).values()
    add, unit, par = unpack_slot(entry, 2, H)
    got = apply_op_tables(h, add.expand(5, 2, H), unit.expand(5, 2, H), par.expand(5, 2, 3))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
