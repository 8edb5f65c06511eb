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

import asyncio
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


PRECISIONS = ("auto", "fast", "exact")


def check_precision(precision) -> None:
    if precision not in PRECISIONS:
        raise ValidationError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def bf16_matmul_is_fast() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16); emulated it is slower."""
    caps = getattr(torch.cpu, "get_capabilities", dict)()
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


class Unembedding:
    """RMSNorm (the Llama/Qwen final norm) followed by the unembedding matrix, in float32."""

    def __init__(self, norm_weight: torch.Tensor, head: torch.Tensor, eps: float):
        self.norm_weight = norm_weight.detach().float().cpu()
        self.head = head.detach().float().cpu()          # [vocab, hidden]
        self.eps = float(eps)
        self._head_bf16: torch.Tensor | None = None
        self._packed: torch.Tensor | None = None

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

    def top_k(self, normed: torch.Tensor, k: int, precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` token ids and softmax probabilities of normed rows ``[n, hidden]``: ``([n, k], [n, k])``.

        ``"exact"`` reads out every row in float32. ``"fast"`` finds candidates with a bfloat16
        readout, then scores them in float32: ids, ranks and the top logits are the float32
        readout's (a row whose candidates leave doubt is read out in float32 again); the
        probabilities' normaliser takes the rest of the vocab from the bfloat16 logits, which moves
        them by < 1 % relative (0.6 % at most over 6000 rows of the default model,
        benchmarks/lens_bench.py; the stream's rounding to bfloat16 is most of it).
        ``"auto"`` is ``"fast"`` where bfloat16 matmuls have hardware support (AMX / AVX512-BF16,
        3-4x float32 here) and ``"exact"`` elsewhere.

        >>> ids, probs = lens.top_k(lens.normed(h), 5, precision="exact")   # doctest: +SKIP
        """
        check_precision(precision)
        if precision == "fast" or (precision == "auto" and bf16_matmul_is_fast()):
            return self._top_k_fast(normed, k)
        return self._top_k_exact(normed, k)

    def _top_k_exact(self, normed: torch.Tensor, k: int, chunk: int = 512):
        ids_out = torch.empty(normed.shape[0], k, dtype=torch.long)
        probs_out = torch.empty(normed.shape[0], k)
        with torch.inference_mode():
            # chunks of rows: the [rows, vocab] logits stay in 100 MB blocks instead of one [L*T, vocab]
            # tensor (1.2 GB for 30 layers x 200 tokens), and no softmax over the vocab is stored
            for a in range(0, normed.shape[0], chunk):
                logits = normed[a:a + chunk] @ self.head.T
                top = torch.topk(logits, k, dim=-1)
                ids_out[a:a + chunk] = top.indices
                # the softmax normaliser in place from the top-k's max. Not torch.logsumexp (0.64 s against
                # 0.34 s for 6000 rows here; benchmarks/lens_bench.py prints both): CPU exp is slow for inputs
                # far below zero; clamped at -80 (e^-80 ~ 2e-35 per token, below float32 resolution next to
                # the top token's 1) the sum is the same
                top_logit = top.values[:, :1]
                total = logits.sub_(top_logit).clamp_(min=-80.0).exp_().sum(-1, keepdim=True)
                probs_out[a:a + chunk] = torch.exp(top.values - top_logit) / total
        return ids_out, probs_out

    def _top_k_fast(self, normed: torch.Tensor, k: int, margin: int = 16, chunk: int = 128):
        # Why by hand: no library offers a mixed-precision top-k readout. The float32 matmul is ~2/3 of
        # the exact lens's time (1.6 s of 2.5 s for 30 layers x 200 tokens here); a bfloat16 one is
        # 0.33 s on AMX, but its logits are off by ~0.03 (up to ~0.5), enough to swap close tokens.
        # So bfloat16 only proposes candidates and the rest of the normaliser; float32 decides.
        n, vocab = normed.shape[0], self.head.shape[0]
        want = min(k + margin, vocab)
        block = 64 if vocab % 64 == 0 and vocab // 64 >= want else 1
        ids_out = torch.empty(n, k, dtype=torch.long)
        probs_out = torch.empty(n, k)
        redo = []
        rows_bf16 = normed.bfloat16()
        logits = torch.empty(min(chunk, n), vocab)
        offsets = torch.arange(block)
        with torch.inference_mode():
            for a in range(0, n, chunk):
                h = normed[a:a + chunk]
                c = h.shape[0]
                lf = logits[:c]
                lf.copy_(self._bf16_logits(rows_bf16[a:a + chunk], chunk))
                # the candidates through 64-token block maxima: a token among the row's `want` largest
                # lies in one of the `want` blocks with the largest maxima; a topk over the vocab
                # itself costs ~2x more here
                blocks = torch.topk(lf.view(c, vocab // block, block).amax(-1), want, dim=-1).indices
                cols = (blocks[:, :, None] * block + offsets).view(c, -1)
                cand = torch.topk(lf.gather(1, cols), want, dim=-1)
                cand_ids = cols.gather(1, cand.indices)
                # float32 logits of the candidates: the chunk's rows share most of them (neighbouring
                # positions and layers), so one small matmul over the distinct ids, then a gather
                distinct, where = torch.unique(cand_ids, return_inverse=True)
                exact = (h @ self.head[distinct].T).gather(1, where)
                top = torch.topk(exact, k, dim=-1)
                approx = cand.values
                # a token outside the candidates has a bfloat16 logit <= the last candidate's; its float32
                # logit could still reach the k-th if the bfloat16 error is large: the error bound is
                # taken from the candidates' own errors, with a 4x margin; such rows are redone exactly
                err = (exact - approx).abs().amax(-1)
                if want < vocab:
                    doubt = approx[:, -1] + 4 * err >= top.values[:, -1]
                    if bool(doubt.any()):
                        redo.append(a + doubt.nonzero()[:, 0])
                # the normaliser unshifted where the row's logits allow it (exp is finite up to 88; a
                # far-negative token underflows, which is what it contributes anyway): shifting is one
                # more pass over the [rows, vocab] block
                top_logit = top.values[:, :1]
                shift = torch.where(top_logit.abs() > 60, top_logit, torch.zeros_like(top_logit))
                if bool(shift.any()):
                    lf.sub_(shift)
                total = lf.exp_().sum(-1, keepdim=True)
                # the candidates' share from their float32 logits instead of the bfloat16 ones
                total += (exact - shift).exp().sum(-1, keepdim=True) \
                    - (approx - shift).exp().sum(-1, keepdim=True)
                ids_out[a:a + c] = cand_ids.gather(1, top.indices)
                probs_out[a:a + c] = torch.exp(top.values - shift) / total
        if redo:
            rows = torch.cat(redo)
            ids_out[rows], probs_out[rows] = self._top_k_exact(normed[rows], k)
        return ids_out, probs_out

    def _bf16_logits(self, rows: torch.Tensor, chunk: int) -> torch.Tensor:
        """``rows @ head.T`` in bfloat16, through a oneDNN weight packed once where torch has the op."""
        if self._head_bf16 is None:
            self._head_bf16 = self.head.bfloat16()
            # oneDNN re-lays the weight out for AMX on every plain matmul call (56 MB here, once per
            # chunk); packing it once halves the readout (0.33 s -> 0.16 s for 6000 rows). These are
            # the ops torch's own inductor freezing uses; any failure falls back to the plain matmul
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(self._head_bf16, chunk)
                probe = self._head_bf16[:2]
                got = torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
                self._packed = packed if torch.equal(got, probe @ self._head_bf16.T) else None
            except Exception:   # noqa: BLE001 - an optional speed-up, any failure means "not here"
                self._packed = None
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(rows, self._packed, None, "none", [], "")
        return rows @ self._head_bf16.T


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


async def logit_lens(model, prompt, layers=None, top_k: int = 5, steering=None,
                     precision: str = "auto") -> LogitLens:
    """The logit lens of a prompt: each layer's stream through the final norm and unembedding.

    ``prompt`` is a string or chat messages (rendered with the chat template, no generation
    prompt). One forward captures every layer in ``layers`` (default all); the readout of all
    layers x positions is one batched matmul. The last layer's top-1 is the model's own next token.
    ``precision`` is ``"auto"``, ``"fast"`` or ``"exact"``; see ``Unembedding.top_k``.

    >>> lens = await wb.logit_lens(model, "The capital of France is", top_k=3)   # doctest: +SKIP
    >>> lens.table().query("rank == 0").tail()                                   # doctest: +SKIP
    """
    layers = list(range(model.layer_count)) if layers is None else [model.check_layer(int(l)) for l in layers]
    if not layers:
        raise ValidationError("logit_lens needs at least one layer")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= 100:
        raise ValidationError(f"top_k must be an integer in 1..100, got {top_k!r}")
    check_precision(precision)
    if isinstance(prompt, str):
        ids = model.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    else:
        from .chat import check_chat_options, normalize_conversations, render_chat

        [conv], _ = normalize_conversations(prompt)
        ids = render_chat(model.tokenizer, conv, check_chat_options({"add_generation_prompt": False})).token_ids
    [acts] = await model.encode([ids], layers=layers, steering=steering)
    lens = Unembedding.of(model)
    T = len(ids)

    def readout():
        h = torch.cat([acts[layer].float() for layer in layers])        # [L*T, H]
        return lens.top_k(lens.normed(h), top_k, precision=precision)

    # in a worker thread: the readout takes ~0.5 s (more in float32) and the event loop (a notebook
    # kernel's, a server's) keeps streaming other replies meanwhile
    ids_out, probs_out = await asyncio.to_thread(readout)
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
