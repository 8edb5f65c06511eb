"""Spec tables: a ``SteeringSpec`` packed into the workers' op positions, and the slots that hold them.

The math of an op position is ``workbench.opmath`` (shared with the reference ops and the ``hf``
backend). ``pack_spec`` runs in the kernel; ``unpack_slot`` in the workers (``wb_set_slot``);
``Slots`` is the kernel's book of which spec fingerprint sits in which slot.

Slot life cycle: slot 0 is "no steering" and never written. A request's spec fingerprint gets a
slot at admission (``Slots.acquire``), uploaded once (``wb_set_slot``) and kept while requests use
it (reference counts); an unused slot is reused for a new spec, least recently used first; when
every slot is busy, new requests wait in the queue. A failed upload forgets the slot.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ...errors import ValidationError
from ...opmath import apply_op_positions
from ...steering import AblationSpec, AddSpec, ProjectionCapSpec, SteeringSpec, op_kind

__all__ = ["Slots", "apply_op_positions", "pack_spec", "unpack_slot"]


def pack_spec(spec: SteeringSpec, hidden: int, max_ops: int) -> dict:
    """Compile a spec to per-layer op tables: ``{layer: float32 bytes of add [M,H], dir [M,H], par [M,3]}``.

    One op position holds an add followed by a projection (see ``workbench.opmath``). A layer that needs
    more than ``max_ops`` positions is refused: silently dropping an op would return unsteered text.

    >>> import torch, workbench as wb
    >>> spec = wb.SteeringSpec(layers={3: wb.LayerSteeringSpec(operations=[wb.AddSpec(torch.ones(4))])})
    >>> sorted(pack_spec(spec, hidden=4, max_ops=2))
    [3]
    """
    tables = {}
    for layer in spec.layer_indices():
        positions = []  # [add vector or None, (unit, lo, hi, c) or None]
        for op in spec.layers[layer].operations:
            if isinstance(op, AddSpec):
                if not positions or positions[-1][1] is not None or positions[-1][0] is not None:
                    positions.append([None, None])
                positions[-1][0] = op.scale * op.vector
                continue
            v = op.vector.to(torch.float32)
            unit = v / v.norm()
            if isinstance(op, ProjectionCapSpec):
                proj = (unit, -float("inf") if op.min is None else op.min, float("inf") if op.max is None else op.max, 0.0)
            elif isinstance(op, AblationSpec):
                proj = (unit, -float("inf"), float("inf"), op.scale - 1.0)
            else:  # SAE clamps are refused at input (VLLMSteerModel.capabilities); a caller of this function may not be
                raise ValidationError(f"the vllm backend cannot apply {op_kind(op)} ops")
            if not positions or positions[-1][1] is not None:
                positions.append([None, None])
            positions[-1][1] = proj
        if len(positions) > max_ops:
            raise ValidationError(
                f"layer {layer} needs {len(positions)} op positions but the vllm engine was started with "
                f"max_ops_per_layer={max_ops} (an add followed by a cap or ablation shares one position); "
                f"load with wb.load(..., backend='vllm', max_ops_per_layer={len(positions)})")
        add = torch.zeros(max_ops, hidden)
        unit = torch.zeros(max_ops, hidden)
        par = torch.tensor([[-float("inf"), float("inf"), 0.0]] * max_ops)
        for j, (a, proj) in enumerate(positions):
            if a is not None:
                add[j] = a
            if proj is not None:
                unit[j] = proj[0]
                par[j] = torch.tensor(proj[1:])
        tables[layer] = torch.cat([add.flatten(), unit.flatten(), par.flatten()]).numpy().tobytes()
    return tables


def unpack_slot(entry: bytes, ops: int, hidden: int) -> tuple:
    """The ``(add [M,H], unit [M,H], par [M,3])`` views of one layer's packed bytes (``pack_spec``'s format)."""
    flat = torch.frombuffer(bytearray(entry), dtype=torch.float32)
    m = ops
    return (flat[:m * hidden].view(m, hidden), flat[m * hidden:2 * m * hidden].view(m, hidden),
            flat[2 * m * hidden:].view(m, 3))


class Slots:
    """Spec fingerprint -> table slot, with reference counts (slot 0 = no steering, never written)."""

    def __init__(self, count: int):
        self.count = count
        self.of: OrderedDict = OrderedDict()  # fingerprint -> slot, least recently used first
        self.refs: dict = {}                  # fingerprint -> running requests using it

    def acquire(self, fingerprint: str):
        """``(slot, needs_upload)``, or ``None`` when every slot is busy."""
        if fingerprint in self.of:
            self.of.move_to_end(fingerprint)
            self.refs[fingerprint] = self.refs.get(fingerprint, 0) + 1
            return self.of[fingerprint], False
        used = set(self.of.values())
        free = [s for s in range(1, self.count) if s not in used]
        if free:
            slot = free[0]
        else:
            idle = [fp for fp in self.of if self.refs.get(fp, 0) == 0]
            if not idle:
                return None
            slot = self.of.pop(idle[0])
            self.refs.pop(idle[0], None)
        self.of[fingerprint] = slot
        self.refs[fingerprint] = 1
        return slot, True

    def forget(self, fingerprint: str) -> None:
        """Drop a slot whose upload failed."""
        self.of.pop(fingerprint, None)
        self.refs.pop(fingerprint, None)

    def release(self, fingerprint: str) -> None:
        if fingerprint in self.refs:
            self.refs[fingerprint] = max(0, self.refs[fingerprint] - 1)
