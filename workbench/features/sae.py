"""Sparse autoencoders in SAELens layout: ``cfg.json`` + ``sae_weights.safetensors``.

Tensors: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` and,
for JumpReLU, ``threshold [d_sae]``. The activation comes from ``cfg["architecture"]``
(``standard`` = ReLU, ``jumprelu``, ``topk``) or ``cfg["activation_fn_str"]`` (``relu``/``topk`` with
``activation_fn_kwargs["k"]``). The layer comes from ``hook_name``: ``blocks.L.hook_resid_post`` is the
workbench's layer L, ``blocks.L.hook_resid_pre`` is layer L-1.

>>> sae = SAE.load("path/to/sae")  # doctest: +SKIP
>>> acts = sae.encode(hidden)      # [tokens, d_sae]
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ValidationError
from ..steering import SAEClampSpec


@dataclass
class SAE:
    """Encoder/decoder weights of one SAE and the layer it reads."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    layer: int
    activation: str = "relu"          # relu | jumprelu | topk
    threshold: torch.Tensor | None = None
    k: int | None = None
    apply_b_dec_to_input: bool = True
    name: str = "sae"

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @classmethod
    def load(cls, path, layer: int | None = None) -> "SAE":
        path = Path(path)
        cfg_path, weights_path = path / "cfg.json", path / "sae_weights.safetensors"
        if not cfg_path.is_file() or not weights_path.is_file():
            raise ValidationError(f"{str(path)!r} is not an SAE folder: it needs cfg.json and sae_weights.safetensors")
        try:
            cfg = json.loads(cfg_path.read_text())
            from safetensors.torch import load_file

            w = load_file(str(weights_path))
        except Exception as exc:
            raise ValidationError(f"cannot read the SAE at {str(path)!r}: {exc}") from exc
        missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in w]
        if missing:
            raise ValidationError(f"SAE weights at {str(path)!r} lack {missing}")
        arch = str(cfg.get("architecture", "standard")).lower()
        act_fn = str(cfg.get("activation_fn_str", "relu")).lower()
        activation = "jumprelu" if arch == "jumprelu" else "topk" if (arch == "topk" or act_fn == "topk") else "relu"
        k = (cfg.get("activation_fn_kwargs") or {}).get("k") or cfg.get("k")
        if activation == "jumprelu" and "threshold" not in w:
            raise ValidationError(f"SAE at {str(path)!r} is JumpReLU but has no 'threshold' tensor")
        if activation == "topk" and not k:
            raise ValidationError(f"SAE at {str(path)!r} is TopK but cfg.json gives no k")
        if layer is None:
            layer = _layer_from_hook(cfg.get("hook_name") or cfg.get("hook_point") or "", path)
        sae = cls(W_enc=w["W_enc"].float(), b_enc=w["b_enc"].float(), W_dec=w["W_dec"].float(), b_dec=w["b_dec"].float(),
                  layer=int(layer), activation=activation, threshold=w.get("threshold"), k=int(k) if k else None,
                  apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), name=path.name)
        sae.check()
        return sae

    def check(self) -> None:
        d_in, d_sae = self.W_enc.shape
        if tuple(self.W_dec.shape) != (d_sae, d_in) or self.b_enc.numel() != d_sae or self.b_dec.numel() != d_in:
            raise ValidationError(
                f"SAE shapes do not fit: W_enc {tuple(self.W_enc.shape)}, W_dec {tuple(self.W_dec.shape)}, "
                f"b_enc {self.b_enc.numel()}, b_dec {self.b_dec.numel()}"
            )
        if self.threshold is not None and self.threshold.numel() != d_sae:
            raise ValidationError(f"SAE threshold has {self.threshold.numel()} entries, expected {d_sae}")

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """Feature activations ``[..., d_sae]`` of residuals ``[..., d_in]``."""
        h = h.float()
        x = h - self.b_dec if self.apply_b_dec_to_input else h
        pre = x @ self.W_enc + self.b_enc
        if self.activation == "jumprelu":
            return pre * (pre > self.threshold)
        if self.activation == "topk":
            vals, idx = torch.topk(pre, self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        return torch.relu(pre)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return acts @ self.W_dec + self.b_dec

    def clamp_op(self, indices: list[int], values: list[float]) -> SAEClampSpec:
        """The steering op that sets features ``indices`` to ``values`` (error term kept)."""
        idx = torch.tensor(indices, dtype=torch.long)
        return SAEClampSpec(
            encoder=self.W_enc[:, idx], encoder_bias=self.b_enc[idx], decoder=self.W_dec[idx],
            decoder_bias=self.b_dec, values=torch.tensor(values, dtype=torch.float32),
            threshold=self.threshold[idx] if self.activation == "jumprelu" else None,
            apply_b_dec_to_input=self.apply_b_dec_to_input,
        )


def _layer_from_hook(hook: str, path) -> int:
    m = re.search(r"(?:blocks|layers)\.(\d+)\.hook_resid_(pre|post|mid)", hook)
    if not m:
        raise ValidationError(
            f"cannot tell the layer of the SAE at {str(path)!r} from hook_name {hook!r}; pass layer= explicitly"
        )
    layer = int(m.group(1))
    return layer - 1 if m.group(2) == "pre" else layer


def load_labels(path, d_sae: int) -> dict:
    """Neuronpedia-style labels: a JSON list of ``{"index": i, "description": "..."}``; returns ``{i: record}``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except Exception as exc:
        raise ValidationError(f"cannot read labels file {str(path)!r}: {exc}") from exc
    if isinstance(data, dict):
        data = data.get("explanations") or data.get("labels") or list(data.values())
    if not isinstance(data, list):
        raise ValidationError(f"labels file {str(path)!r} must hold a JSON list of {{index, description}}")
    out = {}
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or "index" not in rec or "description" not in rec:
            raise ValidationError(f"labels file {str(path)!r}: entry {i} needs 'index' and 'description', got {rec!r}")
        idx = int(rec["index"])
        if not 0 <= idx < d_sae:
            raise ValidationError(
                f"labels file {str(path)!r}: index {idx} does not exist in an SAE with {d_sae} features (0..{d_sae - 1})"
            )
        out[idx] = rec
    return out
