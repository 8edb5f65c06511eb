"""The model's readout in the kernel: final norm + unembedding applied to residual-stream rows.

Both backends capture the residual stream at the output of every block; the last block's output
through the final norm and the unembedding *is* the model's next-token logits, and through an
earlier block's output it is the logit lens. On the ``hf`` backend the modules are taken from the
loaded model; on ``vllm`` (whose weights live in other processes) the two small tensors are read
from the model folder's safetensors files.

>>> lens = Unembedding.of(model)                              # doctest: +SKIP
>>> [acts] = await model.encode(["The capital of France is"], layers=[model.layer_count - 1])  # doctest: +SKIP
>>> lens.logits(acts[model.layer_count - 1])[-1].argmax()     # the model's own next token  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import ValidationError

# key names of the final norm and the unembedding in HF checkpoints (Llama, Qwen2/3, Mistral, ...)
_NORM_KEYS = ("model.norm.weight",)
_HEAD_KEYS = ("lm_head.weight",)
_TIED_KEYS = ("model.embed_tokens.weight",)


class Unembedding:
    """RMSNorm (the Llama/Qwen final norm) followed by the unembedding matrix, in float32."""

    def __init__(self, norm_weight: torch.Tensor, head: torch.Tensor, eps: float):
        self.norm_weight = norm_weight.detach().float().cpu()
        self.head = head.detach().float().cpu()          # [vocab, hidden]
        self.eps = float(eps)

    @classmethod
    def of(cls, model) -> "Unembedding":
        """The readout of a loaded ``SteerModel`` (built once, kept on the model)."""
        cached = model.__dict__.get("_unembedding")
        if cached is not None:
            return cached
        hf = getattr(model, "hf_model", None)
        if hf is not None:
            norm = hf.model.norm
            eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
            lens = cls(norm.weight, hf.get_output_embeddings().weight, eps)
        else:
            lens = cls.from_folder(getattr(model, "path"))
        model.__dict__["_unembedding"] = lens
        return lens

    @classmethod
    def from_folder(cls, path) -> "Unembedding":
        """Read the final norm and unembedding from an HF folder's safetensors files."""
        from safetensors import safe_open

        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        found: dict = {}
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key in _NORM_KEYS + _HEAD_KEYS + _TIED_KEYS:
                        found[key] = f.get_tensor(key)
        norm = next((found[k] for k in _NORM_KEYS if k in found), None)
        head = next((found[k] for k in _HEAD_KEYS if k in found), None)
        if head is None and config.get("tie_word_embeddings", False):
            head = next((found[k] for k in _TIED_KEYS if k in found), None)
        if norm is None or head is None:
            raise ValidationError(f"no final norm / unembedding weights found in {str(path)!r} "
                                  f"(looked for {_NORM_KEYS + _HEAD_KEYS + _TIED_KEYS})")
        return cls(norm, head, config.get("rms_norm_eps", 1e-6))

    def normed(self, h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``[..., vocab]`` logits of residual rows ``[..., hidden]`` (final norm, then unembedding)."""
        return self.normed(h) @ self.head.T
