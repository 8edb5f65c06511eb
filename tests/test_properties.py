"""Property tests (hypothesis) on the steering math and spec files."""

import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import workbench as wb
from workbench.steering import apply_ops

H = 16
floats = st.floats(min_value=-50, max_value=50, allow_nan=False, allow_infinity=False, width=32)
vectors = st.lists(floats, min_size=H, max_size=H).filter(lambda v: sum(x * x for x in v) > 1e-3)
hidden = st.lists(st.lists(floats, min_size=H, max_size=H), min_size=1, max_size=6)


@st.composite
def ops(draw):
    kind = draw(st.sampled_from(["add", "cap", "ablation"]))
    v = torch.tensor(draw(vectors))
    if kind == "add":
        return wb.AddSpec(v, draw(st.floats(-3, 3, allow_nan=False)))
    if kind == "ablation":
        return wb.AblationSpec(v, draw(st.floats(-2, 3, allow_nan=False)))
    lo = draw(st.one_of(st.none(), st.floats(-20, 20, allow_nan=False)))
    hi = draw(st.one_of(st.none(), st.floats(-20, 20, allow_nan=False)))
    if lo is None and hi is None:
        hi = 1.0
    if lo is not None and hi is not None and lo > hi:
        lo, hi = hi, lo
    return wb.ProjectionCapSpec(v, min=lo, max=hi)


specs = st.dictionaries(st.integers(0, 5), st.lists(ops(), min_size=1, max_size=4), max_size=4).map(
    lambda d: wb.SteeringSpec(layers={k: wb.LayerSteeringSpec(operations=v) for k, v in d.items()}))


def _same(a: wb.SteeringSpec, b: wb.SteeringSpec):
    assert a.layer_indices() == b.layer_indices()
    for layer in a.layer_indices():
        for x, y in zip(a.layers[layer].operations, b.layers[layer].operations, strict=True):
            assert type(x) is type(y) and torch.equal(x.vector, y.vector)
            for attr in ("scale", "min", "max"):
                assert getattr(x, attr, None) == getattr(y, attr, None)


@given(specs)
@settings(max_examples=60, deadline=None)
def test_spec_round_trips(spec):
    _same(spec, wb.SteeringSpec.from_dict(spec.to_dict()))
    with tempfile.TemporaryDirectory() as tmp:
        _same(spec, wb.SteeringSpec.load(spec.save(Path(tmp) / "s.safetensors")))
    assert wb.SteeringSpec.from_dict(spec.to_dict()).fingerprint() == spec.fingerprint()


@given(hidden, vectors, st.floats(-20, 20, allow_nan=False), st.floats(0, 20, allow_nan=False))
@settings(max_examples=100, deadline=None)
def test_cap_bounds_hold(h, v, lo, width):
    h, v = torch.tensor(h), torch.tensor(v)
    out = wb.ProjectionCapSpec(v, min=lo, max=lo + width).apply(h)
    p = out @ (v / v.norm())
    tol = 1e-3 * (1 + h.abs().max())
    assert bool((p >= lo - tol).all() and (p <= lo + width + tol).all())


@given(hidden, vectors)
@settings(max_examples=100, deadline=None)
def test_ablation_with_scale_one_is_identity(h, v):
    h = torch.tensor(h)
    torch.testing.assert_close(wb.AblationSpec(torch.tensor(v), 1.0).apply(h), h)


@given(hidden, st.lists(ops(), min_size=2, max_size=4))
@settings(max_examples=60, deadline=None)
def test_ops_compose_in_list_order(h, op_list):
    h = torch.tensor(h)
    step = h
    for op in op_list:
        step = op.apply(step)
    torch.testing.assert_close(apply_ops(h, op_list), step)
    torch.testing.assert_close(wb.LayerSteeringSpec(operations=op_list).apply(h), step)


@given(st.integers(0, 2**31 - 1), st.sets(st.integers(0, 3), min_size=1, max_size=4))
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_zero_specs_are_bit_identical_to_none(tiny, seed, layers):
    from workbench._sync import run  # the engine is loop-agnostic: a sync helper drives it

    zero = wb.SteeringSpec(layers={l: [wb.AddSpec(torch.zeros(tiny.hidden_size))] for l in layers})
    params = wb.SamplingParams(temperature=0.8, seed=seed, max_tokens=6, ignore_eos=True)
    _, [a] = run(tiny.generate("Hello there", params, steering=wb.SteeringSpec(), capture_layers=[3]))
    _, [b] = run(tiny.generate("Hello there", params, steering=zero, capture_layers=[3]))
    assert a.generated_token_ids == b.generated_token_ids and torch.equal(a.hidden(3), b.hidden(3))
