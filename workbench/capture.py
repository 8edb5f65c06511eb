"""Capture handles: per-request activations, message slices and norm tables.

A handle holds, per captured layer, the residual stream after steering for every token the
model processed: prompt tokens, then generated tokens but the last (capture length =
prompt + generated - 1).

>>> texts, handles = await model.generate(["Hello"], wb.SamplingParams(max_tokens=4), capture_layers=[2])  # doctest: +SKIP
>>> await model.fetch_captures_batch(handles); handles[0].hidden(2).shape  # doctest: +SKIP
torch.Size([4, 576])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import LayerOutOfRangeError, ValidationError


@dataclass
class CaptureHandle:
    """The captured activations of one request (``captures[layer][0]["hidden"]`` as in chatspace)."""

    request_id: str
    layer_indices: tuple
    prompt_token_ids: list = field(default_factory=list)
    generated_token_ids: list = field(default_factory=list)
    message_boundaries: list = field(default_factory=list)
    captures: dict = field(default_factory=dict)
    tokenizer: object = field(default=None, repr=False)

    @property
    def token_ids(self) -> list:
        """The token at each captured position: prompt, then generated but the last."""
        return list(self.prompt_token_ids) + list(self.generated_token_ids[:-1])

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def fetched(self) -> bool:
        return bool(self.captures) or not self.layer_indices

    def _require(self, layer: int) -> None:
        if layer not in self.layer_indices:
            raise LayerOutOfRangeError(f"layer {layer} was not captured; captured layers: {list(self.layer_indices)}")
        if not self.fetched:
            raise ValidationError("captures not fetched yet: await model.fetch_captures_batch(handles) first")

    def hidden(self, layer: int) -> torch.Tensor:
        """``[tokens, hidden]`` residual stream at ``layer`` (after steering)."""
        self._require(layer)
        return self.captures[layer][0]["hidden"]

    def get_message_activations(self, message_idx: int, layer_idx: int, include_generated: bool = False) -> torch.Tensor:
        """Rows of ``hidden(layer_idx)`` for message ``message_idx`` (plus the generated tokens if asked)."""
        if not self.message_boundaries:
            raise ValidationError("this handle has no message boundaries (it came from generate(), not chat())")
        if not 0 <= message_idx < len(self.message_boundaries):
            raise ValidationError(f"message_idx {message_idx} is out of range; allowed 0..{len(self.message_boundaries) - 1}")
        b = self.message_boundaries[message_idx]
        hidden = self.hidden(layer_idx)
        end = hidden.shape[0] if include_generated else b.end_token
        return hidden[b.start_token:end]

    def close(self) -> None:
        """Drop the captured tensors (memory is released once nothing else refers to them)."""
        self.captures = {}

    # -- tables --------------------------------------------------------------------------------
    def _token_rows(self):
        """(position, token text, message_idx, role, phase) per captured position."""
        ids = self.token_ids
        texts = self.tokenizer.convert_ids_to_tokens(ids) if self.tokenizer is not None else [str(i) for i in ids]
        owner = [(-1, "prompt")] * self.prompt_len
        for b in self.message_boundaries:
            for p in range(b.start_token, min(b.end_token, self.prompt_len)):
                owner[p] = (b.index, b.role)
        gen_idx = len(self.message_boundaries)
        rows = []
        for pos in range(len(ids)):
            if pos < self.prompt_len:
                idx, role = owner[pos]
                rows.append((pos, texts[pos], idx, role, "prompt"))
            else:
                rows.append((pos, texts[pos], gen_idx, "assistant", "generated"))
        return rows

    def norms(self):
        """Per-token L2 norms in long form: layer, position, token, message_idx, role, phase, norm."""
        import pandas as pd

        rows = self._token_rows()
        frames = []
        for layer in self.layer_indices:
            n = self.hidden(layer).float().norm(dim=-1).tolist()
            frames.append(pd.DataFrame({
                "layer": layer,
                "position": [r[0] for r in rows],
                "token": [r[1] for r in rows],
                "message_idx": [r[2] for r in rows],
                "role": [r[3] for r in rows],
                "phase": [r[4] for r in rows],
                "norm": n,
            }))
        if not frames:
            return pd.DataFrame(columns=["layer", "position", "token", "message_idx", "role", "phase", "norm"])
        return pd.concat(frames, ignore_index=True)

    def message_norms(self):
        """Mean per-token norm per layer and message (generated tokens form one extra message).

        Columns: layer, message_idx, role, phase, norm (mean), median_norm, num_tokens.
        """
        df = self.norms()
        g = df.groupby(["layer", "message_idx", "role", "phase"], sort=True)["norm"]
        out = g.agg(norm="mean", median_norm="median", num_tokens="size").reset_index()
        return out.sort_values(["layer", "message_idx"]).reset_index(drop=True)
