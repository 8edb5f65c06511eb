"""What every API route does, on a ``SteerModel``: shared by the in-process transport and the server.

Each handler takes a validated request schema and returns a response schema; streaming chat
yields chunk schemas. Bad input raises ``workbench`` errors, which transports turn into 4xx.
"""

from __future__ import annotations

import time
import uuid

from ..errors import ValidationError
from ..features.variant import compile_interventions
from ..models import canonical_name
from ..sampling import SamplingParams
from ..steering import SteeringSpec, merge_specs
from . import schemas as s


class Service:
    """A model plus the names it answers to (``--served-model-name`` aliases).

    >>> service = Service(model, aliases=["meta-llama/Llama-3.1-8B-Instruct"])  # doctest: +SKIP
    """

    def __init__(self, model, aliases=(), max_tokens_limit: int | None = None):
        self.model = model
        self.max_tokens_limit = max_tokens_limit
        self.names = [canonical_name(model.model_name)] + [a for a in aliases if a]

    def check_model(self, name) -> str:
        name = str(getattr(name, "value", name))
        if name not in self.names and canonical_name(name) not in self.names:
            raise ValidationError(f"unknown model {name!r}; this server serves {self.names}")
        return name

    def steering(self, interventions, extra: dict | None = None) -> SteeringSpec:
        """The interventions compiled to a spec, followed at each layer by the ops of ``extra`` (a spec dict)."""
        spec = compile_interventions([iv.model_dump() for iv in interventions], self.model.features) if interventions \
            else SteeringSpec()
        if extra:
            more = SteeringSpec.from_dict(extra).validate(self.model.hidden_size, self.model.layer_count)
            spec = merge_specs(spec, more)
        return spec

    def _spec(self, req) -> SteeringSpec:
        return self.steering(req.interventions, req.steering)

    @staticmethod
    def _messages(messages) -> list[dict]:
        return [m.model_dump() for m in messages]

    @staticmethod
    def _meta(prefix: str) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex[:16]}", "created": int(time.time())}

    # -- chat ----------------------------------------------------------------------------------
    def _sampling(self, req: s.ChatCompletionRequest) -> SamplingParams:
        wanted = req.max_tokens or req.max_completion_tokens
        if self.max_tokens_limit is not None and wanted > self.max_tokens_limit:
            raise ValidationError(f"max tokens {wanted} is over this server's limit of {self.max_tokens_limit}")
        return SamplingParams(temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                              max_tokens=wanted,
                              repetition_penalty=req.repetition_penalty, stop=req.stop or [])

    @staticmethod
    def _chat_options(req: s.ChatCompletionRequest) -> dict | None:
        return {"continue_final_message": True} if req.continue_final_message else None

    async def chat(self, req: s.ChatCompletionRequest) -> s.ChatCompletionResponse:
        name = self.check_model(req.model)
        messages = self._messages(req.messages)
        [reply] = await self.model.chat(messages, self._sampling(req), steering=self._spec(req),
                                        chat_options=self._chat_options(req))
        prompt = len(self.model._render([messages], self._chat_options(req))[0].token_ids)
        return s.ChatCompletionResponse(
            **self._meta("chatcmpl"), model=name,
            choices=[s.ChatCompletionChoice(index=0, message=s.ChatCompletionMessage(content=reply.generated),
                                            finish_reason=reply.finish_reason)],
            usage=s.ChatCompletionUsage(prompt_tokens=prompt, completion_tokens=len(reply.token_ids),
                                        total_tokens=prompt + len(reply.token_ids)),
        )

    async def chat_stream(self, req: s.ChatCompletionRequest):
        """Chunks: first the role, then text deltas, then one with the finish reason."""
        name = self.check_model(req.model)
        meta = self._meta("chatcmpl")
        spec = self._spec(req)
        sampling = self._sampling(req)
        messages = self._messages(req.messages)

        def chunk(delta: s.ChatCompletionDelta, finish=None):
            return s.ChatCompletionChunk(**meta, model=name,
                                         choices=[s.ChatCompletionChunkChoice(index=0, delta=delta, finish_reason=finish)])

        yield chunk(s.ChatCompletionDelta(role="assistant", content=""))
        async for piece in self.model.stream_chat(messages, sampling, steering=spec, chat_options=self._chat_options(req)):
            if piece.finish_reason is not None:
                yield chunk(s.ChatCompletionDelta(), finish=piece.finish_reason)
            elif piece.text:
                yield chunk(s.ChatCompletionDelta(content=piece.text))

    # -- features ------------------------------------------------------------------------------
    @staticmethod
    def _item(feature) -> s.FeatureItem:
        return s.FeatureItem(**feature.to_item())

    async def search(self, req: s.FeatureSearchRequest) -> s.FeatureSearchResponse:
        self.check_model(req.model_name)
        return s.FeatureSearchResponse(data=[self._item(f) for f in self.model.features.search(req.query, req.top_k)])

    async def rerank(self, req: s.FeatureRerankRequest) -> s.FeatureRerankResponse:
        self.check_model(req.model_name)
        ranked = self.model.features.rerank(req.query, [f.model_dump() for f in req.features], req.top_k)
        return s.FeatureRerankResponse(data=[s.FeatureItem(**f.to_item()) for f in ranked])

    async def _tokens(self, messages) -> int:
        from ..features.inspection import _render

        return len(_render(self.model, messages))

    async def inspect(self, req: s.FeatureInspectionRequest) -> s.FeatureInspectionResponse:
        name = self.check_model(req.model)
        msgs = self._messages(req.messages)
        top = await self.model.features.inspect(msgs, top_k=req.top_k or 10, aggregation_method=req.aggregation_method or "mean",
                                                interventions=self._spec(req))
        return s.FeatureInspectionResponse(
            **self._meta("inspect"), model=name,
            features=[s.FeatureInspection(feature=self._item(f), activation=a) for f, a in top],
            usage=s.Usage(total_tokens=await self._tokens(msgs)))

    async def activations(self, req: s.ActivationsRequest) -> s.ActivationsResponse:
        name = self.check_model(req.model)
        msgs = self._messages(req.messages)
        acts = await self.model.features.activations(msgs, aggregation_method=req.aggregation_method or "mean",
                                                     interventions=self._spec(req))
        return s.ActivationsResponse(**self._meta("activations"), model=name, activations=acts,
                                     usage=s.Usage(total_tokens=await self._tokens(msgs)))

    async def logits(self, req: s.LogitsRequest) -> s.LogitsResponse:
        name = self.check_model(req.model)
        msgs = self._messages(req.messages)
        out = await self.model.features.logits(msgs, top_k=req.top_k, start_idx=req.start_idx, end_idx=req.end_idx,
                                               interventions=self._spec(req))
        return s.LogitsResponse(**self._meta("logits"), model=name, logits=out,
                                usage=s.Usage(total_tokens=await self._tokens(msgs)))

    async def contrast(self, req: s.ContrastRequest) -> s.ContrastResponse:
        name = self.check_model(req.model)
        d1 = [self._messages(c) for c in req.dataset_1]
        d2 = [self._messages(c) for c in req.dataset_2]
        add, remove = await self.model.features.contrast(
            d1, d2, k_to_add=req.k_to_add or 10, k_to_remove=req.k_to_remove or 10,
            interventions_1=self.steering(req.interventions_1), interventions_2=self.steering(req.interventions_2))
        total = sum([await self._tokens(c) for c in d1 + d2])
        return s.ContrastResponse(**self._meta("contrast"), model=name, top_to_add=[self._item(f) for f in add],
                                  top_to_remove=[self._item(f) for f in remove], usage=s.Usage(total_tokens=total))

    async def token_activations(self, req: s.TokenActivationsRequest) -> s.TokenActivationsResponse:
        name = self.check_model(req.model)
        msgs = self._messages(req.messages)
        table = await self.model.features.token_table(msgs, req.features, interventions=self._spec(req))
        return s.TokenActivationsResponse(
            **self._meta("tokens"), model=name, tokens=table["tokens"], message_idx=table["message_idx"],
            features=[self._item(f) for f in table["features"]], activations=table["activations"],
            usage=s.Usage(total_tokens=await self._tokens(msgs)))

    async def norms(self, req: s.NormsRequest) -> s.NormsResponse:
        name = self.check_model(req.model)
        layers = req.layers if req.layers is not None else list(range(self.model.layer_count))
        msgs = self._messages(req.messages)
        _, [handle] = await self.model.chat(msgs, SamplingParams(temperature=0.0, max_tokens=1), capture_layers=layers,
                                            steering=self._spec(req),
                                            chat_options={"add_generation_prompt": False})
        df = handle.norms()
        handle.close()
        return s.NormsResponse(**self._meta("norms"), model=name, layer=df.layer.astype(int).tolist(),
                               position=df.position.astype(int).tolist(), token=df.token.astype(str).tolist(),
                               message_idx=df.message_idx.astype(int).tolist(), role=df.role.astype(str).tolist(),
                               norm=df.norm.astype(float).tolist(),
                               usage=s.Usage(total_tokens=len(handle.prompt_token_ids)))

    async def models(self) -> s.ModelList:
        return s.ModelList(data=[s.ModelCard(id=n) for n in self.names])
