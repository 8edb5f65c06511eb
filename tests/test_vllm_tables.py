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
from workbench.engine.vllm import _Slots, pack_spec
from workbench.engine.vllm_worker import _assemble, apply_op_tables

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
    slots = _Slots(3)  # slot 0 reserved: two usable
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
    out = _assemble([(0, a), (3, b), (3, b * 2)])  # a recomputed chunk (preemption) overwrites
    assert out.shape == (5, H) and float(out[4, 0]) == 4.0
    with pytest.raises(RuntimeError, match="missing position 3"):
        _assemble([(0, a), (4, b)])
