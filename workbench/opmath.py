"""The steering op math, in one place: the reference ops, the ``hf`` backend and vLLM's workers all call it.

Three of the four op kinds are one *op position*: ``h <- h + a``, then with ``p = h . u``
(``u`` a unit vector) ``h <- h + (clamp(p, lo, hi) - p + c * p) * u``:

- ``AddSpec``: ``a = scale * vector``, no projection;
- ``ProjectionCapSpec``: ``lo, hi = min, max``, ``c = 0``;
- ``AblationSpec``: no clamp, ``c = scale - 1``.

vLLM's workers hold ops as per-token tables of op positions (``apply_op_positions``); the kernel
packs specs into them (``workbench.engine.vllm.tables``). SAE clamps (encode, set, decode) are
their own math, in ``workbench.steering.SAEClampSpec``. This module imports only torch: vLLM's
processes import it.

>>> import torch
>>> h = torch.tensor([[3.0, 4.0]]); u = torch.tensor([1.0, 0.0])
>>> project(h, u, hi=1.0).tolist()          # cap the component along u at 1
[[1.0, 4.0]]
>>> project(h, u, c=-1.0).tolist()          # ablate it (scale 0)
[[0.0, 4.0]]
"""

from __future__ import annotations

import torch


def add(h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``h + a`` (``a`` broadcast over positions)."""
    return h + a


def project(h: torch.Tensor, unit: torch.Tensor, lo=None, hi=None, c=None) -> torch.Tensor:
    """``h + (clamp(p, lo, hi) - p + c * p) * unit`` with ``p = h . unit``; ``None`` bounds / ``c`` are left out.

    ``unit`` is ``[H]`` or per row ``[n, H]``; ``lo``, ``hi``, ``c`` are numbers or ``[n, 1]`` tensors.
    """
    p = (h * unit).sum(dim=-1, keepdim=True)
    delta = torch.clamp(p, min=lo, max=hi) - p if lo is not None or hi is not None else torch.zeros_like(p)
    if c is not None:
        delta = delta + c * p
    return h + delta * unit


def apply_op_positions(h: torch.Tensor, adds: torch.Tensor, units: torch.Tensor, par: torch.Tensor) -> torch.Tensor:
    """Per-row op positions: ``h [n,H]``, ``adds``/``units`` ``[n,M,H]``, ``par [n,M,3]`` (lo, hi, c).

    Pure tensor code (no data-dependent Python), so it is traced into vLLM's compiled graph. An
    unused position is all zero with ``lo, hi = -inf, inf`` and ``c = 0``: it leaves ``h`` as is.
    """
    for j in range(adds.shape[1]):
        h = project(add(h, adds[:, j]), units[:, j], par[:, j, 0:1], par[:, j, 1:2], par[:, j, 2:3])
    return h
