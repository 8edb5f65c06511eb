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

import html
import json
from dataclasses import dataclass, field
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
            lens = cls.from_folder(model.path)
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


# ------------------------------------------------------------------------------------ direction unembedding
@dataclass
class DirectionTokens:
    """The tokens a direction promotes (``promoted``, highest score first) and suppresses (lowest first).

    Each is a DataFrame with columns ``token``, ``token_id``, ``score``.
    """

    promoted: object = field(repr=False)
    suppressed: object = field(repr=False)

    def to_dict(self) -> dict:
        return {"promoted": self.promoted.to_dict("records"), "suppressed": self.suppressed.to_dict("records")}

    def _repr_html_(self) -> str:
        def chips(df):
            return " ".join(f"<code>{html.escape(repr(t))}</code> {s:+.2f}" for t, s in zip(df.token, df.score))
        return f"<div>promotes: {chips(self.promoted)}</div><div>suppresses: {chips(self.suppressed)}</div>"


def direction_tokens(model, direction, top_k: int = 20) -> DirectionTokens:
    """Tokens a direction promotes and suppresses through the readout: ``scores = W_U (g * d̂)``.

    ``direction`` is a ``Feature`` (its write direction; SAE latents: their decoder row) or a
    vector of the model's hidden size; ``g`` is the final norm's gain. The gain is part of the
    readout, the norm's scale is not (it depends on the whole stream, not on the direction), so the
    ranking is what adding the direction to any stream pushes the logits toward.

    >>> dt = wb.direction_tokens(model, model.features["concept/pirate"], top_k=10)   # doctest: +SKIP
    >>> dt.promoted.token.tolist()                                                    # doctest: +SKIP
    """
    import pandas as pd

    from .errors import VectorError

    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValidationError(f"top_k must be a positive integer, got {top_k!r}")
    vec = getattr(direction, "direction", direction)
    try:
        v = torch.as_tensor(vec, dtype=torch.float32).detach().cpu().reshape(-1)
    except Exception as exc:
        raise VectorError(f"direction: cannot convert to a float vector ({exc})") from exc
    if v.numel() != model.hidden_size:
        raise VectorError(f"direction has size {v.numel()}, the model's hidden size is {model.hidden_size}")
    if not bool(torch.isfinite(v).all()) or float(v.norm()) == 0.0:
        raise VectorError("direction must be finite and non-zero")
    lens = Unembedding.of(model)
    scores = lens.head @ (lens.norm_weight * (v / v.norm()))
    k = min(top_k, scores.numel())
    decode = model.tokenizer.decode

    def table(values, ids):
        return pd.DataFrame({"token": [decode([int(i)]) for i in ids], "token_id": [int(i) for i in ids],
                             "score": [float(x) for x in values]})

    hi = torch.topk(scores, k)
    lo = torch.topk(-scores, k)
    return DirectionTokens(table(hi.values, hi.indices), table(-lo.values, lo.indices))


# ------------------------------------------------------------------------------------ logit lens
@dataclass
class LogitLens:
    """Top-k next-token predictions of every captured layer at every position (the logit lens).

    ``top_ids`` / ``top_probs`` are ``[layers, positions, k]``; ``top_tokens[l][p]`` their texts.
    """

    layers: list
    tokens: list
    token_ids: list
    top_ids: torch.Tensor = field(repr=False)
    top_probs: torch.Tensor = field(repr=False)
    top_tokens: list = field(repr=False)

    def table(self):
        """Long DataFrame: layer, position, token, rank, prediction, prediction_id, prob."""
        import pandas as pd

        L, T, K = self.top_ids.shape
        ids, probs = self.top_ids.tolist(), self.top_probs.tolist()
        rows = [{"layer": self.layers[li], "position": p, "token": self.tokens[p], "rank": r,
                 "prediction": self.top_tokens[li][p][r], "prediction_id": ids[li][p][r], "prob": probs[li][p][r]}
                for li in range(L) for p in range(T) for r in range(K)]
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "tokens": list(self.tokens), "token_ids": list(self.token_ids),
                "top_tokens": self.top_tokens, "top_ids": self.top_ids.tolist(), "top_probs": self.top_probs.tolist()}

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(t)}</th>" for t in self.tokens)
        body = []
        probs = self.top_probs[..., 0].tolist()
        for li, layer in enumerate(self.layers):
            cells = "".join(
                f'<td title="{probs[li][p]:.2f}" style="background:rgba(74,120,194,{probs[li][p]:.2f})">'
                f"{html.escape(self.top_tokens[li][p][0])}</td>" for p in range(len(self.tokens)))
            body.append(f"<tr><th>{layer}</th>{cells}</tr>")
        return (f'<table class="wb-logit-lens" style="font-size:11px"><tr><th>layer</th>{head}</tr>'
                f"{''.join(body)}</table>")


async def logit_lens(model, prompt, layers=None, top_k: int = 5, steering=None) -> LogitLens:
    """The logit lens of a prompt: each layer's stream through the final norm and unembedding.

    ``prompt`` is a string or chat messages (rendered with the chat template, no generation
    prompt). One forward captures every layer in ``layers`` (default all); the readout of all
    layers x positions is one batched matmul. The last layer's top-1 is the model's own next token.

    >>> lens = await wb.logit_lens(model, "The capital of France is", top_k=3)   # doctest: +SKIP
    >>> lens.table().query("rank == 0").tail()                                   # doctest: +SKIP
    """
    layers = list(range(model.layer_count)) if layers is None else [model.check_layer(int(l)) for l in layers]
    if not layers:
        raise ValidationError("logit_lens needs at least one layer")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= 100:
        raise ValidationError(f"top_k must be an integer in 1..100, got {top_k!r}")
    if isinstance(prompt, str):
        ids = model.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    else:
        from .chat import check_chat_options, normalize_conversations, render_chat

        [conv], _ = normalize_conversations(prompt)
        ids = render_chat(model.tokenizer, conv, check_chat_options({"add_generation_prompt": False})).token_ids
    [acts] = await model.encode([ids], layers=layers, steering=steering)
    lens = Unembedding.of(model)
    h = torch.cat([acts[layer].float() for layer in layers])            # [L*T, H]
    T = len(ids)
    ids_out = torch.empty(h.shape[0], top_k, dtype=torch.long)
    probs_out = torch.empty(h.shape[0], top_k)
    normed = lens.normed(h)
    with torch.inference_mode():
        # chunks of rows: the [rows, vocab] logits stay in 100 MB blocks instead of one [L*T, vocab]
        # tensor (1.2 GB for 30 layers x 200 tokens), and no softmax over the vocab is stored
        for a in range(0, h.shape[0], 512):
            logits = normed[a:a + 512] @ lens.head.T
            top = torch.topk(logits, top_k, dim=-1)
            ids_out[a:a + 512] = top.indices
            # the softmax normaliser in place from the top-k's max. Not torch.logsumexp (0.64 s against
            # 0.34 s for 6000 rows here; benchmarks/lens_bench.py prints both): CPU exp is slow for inputs
            # far below zero; clamped at -80 (e^-80 ~ 2e-35 per token, below float32 resolution next to
            # the top token's 1) the sum is the same
            top_logit = top.values[:, :1]
            total = logits.sub_(top_logit).clamp_(min=-80.0).exp_().sum(-1, keepdim=True)
            probs_out[a:a + 512] = torch.exp(top.values - top_logit) / total
    top = torch.return_types.topk((probs_out.view(len(layers), T, top_k), ids_out.view(len(layers), T, top_k)))
    decode = model.tokenizer.decode
    cache: dict = {}

    def text(i: int) -> str:
        if i not in cache:
            cache[i] = decode([i])
        return cache[i]

    top_ids = top.indices
    top_tokens = [[[text(i) for i in row] for row in layer] for layer in top_ids.tolist()]
    return LogitLens(layers, [text(int(i)) for i in ids], list(ids), top_ids, top.values, top_tokens)
