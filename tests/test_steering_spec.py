"""Spec types, the steering math against the docs/DESIGN.md formulas, and spec files (no model needed)."""

import math

import pytest
import torch

import workbench as wb
from workbench.steering import apply_ops, replace_op


def _h(seed=0, shape=(5, 16)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 3


def test_add_matches_formula():
    h, v = _h(), _h(1, (16,))
    assert torch.equal(wb.AddSpec(v, scale=2.5).apply(h), h + 2.5 * v)


def test_projection_cap_matches_formula_and_bounds_hold():
    h, v = _h(), _h(2, (16,))
    u = v / v.norm()
    p = h @ u
    out = wb.ProjectionCapSpec(v, min=-0.5, max=0.25).apply(h)
    expected = h + (p.clamp(-0.5, 0.25) - p)[:, None] * u
    torch.testing.assert_close(out, expected)
    q = out @ u
    assert bool((q <= 0.25 + 1e-5).all() and (q >= -0.5 - 1e-5).all())
    # the orthogonal part is untouched
    torch.testing.assert_close(out - q[:, None] * u, h - p[:, None] * u, atol=1e-5, rtol=0)


def test_ablation_matches_formula():
    h, v = _h(), _h(3, (16,))
    u = v / v.norm()
    out = wb.AblationSpec(v, scale=0.1).apply(h)
    torch.testing.assert_close(out, h + (0.1 - 1) * (h @ u)[:, None] * u)
    torch.testing.assert_close(wb.AblationSpec(v, scale=1.0).apply(h), h)
    assert float((wb.AblationSpec(v, scale=0.0).apply(h) @ u).abs().max()) < 1e-5


def test_ops_apply_in_list_order():
    h, v = _h(), _h(4, (16,))
    add, cap = wb.AddSpec(v, 1.0), wb.ProjectionCapSpec(v, max=0.0)
    u = v / v.norm()
    a = apply_ops(h, [add, cap])
    b = apply_ops(h, [cap, add])
    assert float((a @ u).max()) <= 1e-5           # cap last: bound holds
    assert float((b @ u).max()) > 0.5             # add last: shifted past the cap
    assert wb.LayerSteeringSpec(add=add, projection_cap=cap).operations == [add, cap]


@pytest.mark.parametrize("bad, match", [
    ([1.0, float("nan"), 2.0], "non-finite value nan at index 1"),
    ([1.0, float("inf")], "non-finite value inf"),
    ([[1.0, 2.0]], "1-D"),
    ([], "empty"),
    (["a", "b"], "cannot convert"),
])
def test_bad_vectors_are_refused(bad, match):
    with pytest.raises(wb.VectorError, match=match):
        wb.AddSpec(bad)


def test_bad_op_parameters_are_refused():
    with pytest.raises(wb.VectorError, match="zero length"):
        wb.ProjectionCapSpec(torch.zeros(4), max=1.0)
    with pytest.raises(wb.ValidationError, match="min or max"):
        wb.ProjectionCapSpec(torch.ones(4))
    with pytest.raises(wb.ValidationError, match=r"min \(2.0\) must be <= max \(1.0\)"):
        wb.ProjectionCapSpec(torch.ones(4), min=2.0, max=1.0)
    with pytest.raises(wb.ValidationError, match="scale must be finite"):
        wb.AddSpec(torch.ones(4), scale=math.nan)
    with pytest.raises(wb.ValidationError, match="expected AddSpec"):
        wb.LayerSteeringSpec(operations=["not an op"])


def test_validate_against_model_shape():
    spec = wb.SteeringSpec(layers={3: [wb.AddSpec(torch.ones(8))]})
    with pytest.raises(wb.VectorError, match="size 8, the model's hidden size is 16"):
        spec.validate(hidden_size=16, layer_count=4)
    with pytest.raises(wb.LayerOutOfRangeError, match="layer 3 is out of range; allowed 0..2"):
        spec.validate(hidden_size=8, layer_count=3)
    assert spec.validate(hidden_size=8, layer_count=4) is spec


def _spec():
    return wb.SteeringSpec(layers={
        1: wb.LayerSteeringSpec(operations=[wb.AddSpec(_h(5, (8,)), 0.5), wb.ProjectionCapSpec(_h(6, (8,)), min=-1.0)]),
        3: [wb.AblationSpec(_h(7, (8,)), 0.0)],
    })


def _same(a, b):
    assert a.layer_indices() == b.layer_indices()
    for layer in a.layer_indices():
        for x, y in zip(a.layers[layer].operations, b.layers[layer].operations, strict=True):
            assert type(x) is type(y) and torch.equal(x.vector, y.vector)
            assert getattr(x, "scale", None) == getattr(y, "scale", None)
            assert getattr(x, "min", None) == getattr(y, "min", None) and getattr(x, "max", None) == getattr(y, "max", None)


def test_save_load_round_trip(tmp_path):
    spec = _spec()
    loaded = wb.SteeringSpec.load(spec.save(tmp_path / "s.safetensors"))
    _same(spec, loaded)
    assert loaded.fingerprint() == spec.fingerprint()


def test_dict_round_trip_and_fingerprint():
    spec = _spec()
    again = wb.SteeringSpec.from_dict(spec.to_dict())
    _same(spec, again)
    assert again.fingerprint() == spec.fingerprint()
    other = spec.copy()
    other.layers[3] = wb.LayerSteeringSpec(operations=[wb.AblationSpec(_h(7, (8,)), 0.5)])
    assert other.fingerprint() != spec.fingerprint()
    assert wb.SteeringSpec().is_empty() and wb.SteeringSpec().fingerprint() == wb.SteeringSpec(layers={2: []}).fingerprint()


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.ones(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(wb.ValidationError, match="not a workbench steering spec"):
        wb.SteeringSpec.load(tmp_path / "other.safetensors")
    with pytest.raises(wb.ValidationError, match="does not exist"):
        wb.SteeringSpec.load(tmp_path / "missing.safetensors")


def test_replace_op_keeps_canonical_order():
    v = torch.ones(4)
    spec = replace_op(wb.SteeringSpec(), 2, wb.AblationSpec(v, 0.5), wb.AblationSpec)
    spec = replace_op(spec, 2, wb.AddSpec(v, 1.0), wb.AddSpec)
    spec = replace_op(spec, 2, wb.ProjectionCapSpec(v, max=1.0), wb.ProjectionCapSpec)
    assert [type(o) for o in spec.layers[2].operations] == [wb.AddSpec, wb.ProjectionCapSpec, wb.AblationSpec]
    spec = replace_op(spec, 2, wb.AddSpec(v, 3.0), wb.AddSpec)
    assert [o.scale for o in spec.layers[2].operations if isinstance(o, wb.AddSpec)] == [3.0]
    for kind in (wb.AddSpec, wb.ProjectionCapSpec, wb.AblationSpec):
        spec = replace_op(spec, 2, None, kind)
    assert spec.is_empty() and 2 not in spec.layers
