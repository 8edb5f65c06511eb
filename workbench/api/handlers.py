"""What every API route does, on a ``SteerModel``: shared by the in-process transport and the server.

Each handler takes a validated request schema and returns a response schema; streaming chat
yields chunk schemas. Bad input raises ``workbench`` errors, which transports turn into 4xx.
"""

from __future__ import annotations

import asyncio
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

    async def features(self):
        """The model's feature set, loaded in a worker thread on first use (the event loop keeps serving)."""
        return await self.model.load_features()

    async def steering(self, interventions, extra: dict | None = None) -> SteeringSpec:
        """The interventions compiled to a spec, followed at each layer by the ops of ``extra`` (a spec dict)."""
        spec = compile_interventions(interventions, await self.features()) if interventions \
            else SteeringSpec()
        if extra:
            more = SteeringSpec.from_dict(extra).validate(self.model.hidden_size, self.model.layer_count)
            spec = merge_specs(spec, more)
        return spec

    async def _spec(self, req) -> SteeringSpec:
        spec = await self.steering(req.interventions, req.steering)
        cond = getattr(req, "condition", None)
        if cond is not None:
            from ..monitor import Condition

            if spec.condition is not None:
                raise ValidationError("give the condition once: in `condition` or in the `steering` spec, not both")
            probe = (await self._probes([cond.probe]))[0]
            spec = SteeringSpec(spec.layers, condition=Condition(probe, cond.threshold, cond.mode, cond.above, cond.latch))
            spec.validate(self.model.hidden_size, self.model.layer_count)
        return spec

    async def _probes(self, items) -> list:
        """``monitor`` entries as ``monitor.Probe``s: a feature of the model's set, or a vector at a layer."""
        from ..monitor import Probe

        if not items:
            return []
        probes = []
        for i, m in enumerate(items):
            if (m.feature is None) == (m.vector is None):
                raise ValidationError(f"monitor[{i}]: give a feature or a vector (with its layer), not both or neither")
            if m.feature is not None:
                feature = (await self.features()).get(m.feature)
                probes.append(Probe.of(feature, name=m.name))
            else:
                if m.layer is None:
                    raise ValidationError(f"monitor[{i}]: a vector needs its layer")
                probes.append(Probe(m.name or f"vector{i}", m.layer, m.vector, m.bias, m.span, m.cosine))
        return await self.model._probes(probes)   # layer range, vector size, distinct names

    @staticmethod
    def _projections(pr) -> s.ProjectionsBody | None:
        if pr is None:
            return None
        return s.ProjectionsBody(**pr.to_dict())

    @staticmethod
    def _messages(messages) -> list[dict]:
        return [m.model_dump() for m in messages]

    @staticmethod
    def _meta(prefix: str) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex[:16]}", "created": int(time.time())}

    # -- chat ----------------------------------------------------------------------------------
    def _sampling(self, req: s.ChatCompletionRequest) -> SamplingParams:
        wanted = req.max_tokens or req.max_completion_tokens
        if self.max_tokens_limit is not None and wanted * req.n > self.max_tokens_limit:
            many = f" x n={req.n}" if req.n > 1 else ""
            raise ValidationError(f"max tokens {wanted}{many} is over this server's limit of {self.max_tokens_limit}")
        if req.top_logprobs is not None and not req.logprobs:
            raise ValidationError("top_logprobs needs logprobs=true (as in OpenAI's API)")
        if req.stream and req.logprobs:
            raise ValidationError("logprobs are not available with stream=true; ask without streaming")
        if req.stream and req.n > 1:
            raise ValidationError(f"n={req.n} is not available with stream=true (a stream carries one reply); "
                                  "ask without streaming")
        return SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k or 0, min_p=req.min_p,
                              seed=req.seed, max_tokens=wanted, min_tokens=req.min_tokens,
                              repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                              frequency_penalty=req.frequency_penalty, stop=req.stop or [], n=req.n,
                              logprobs=(req.top_logprobs or 0) if req.logprobs else None)

    @staticmethod
    def _chat_options(req: s.ChatCompletionRequest) -> dict | None:
        return {"continue_final_message": True} if req.continue_final_message else None

    async def chat(self, req: s.ChatCompletionRequest) -> s.ChatCompletionResponse:
        name = self.check_model(req.model)
        messages = self._messages(req.messages)
        [out] = await self.model.chat(messages, self._sampling(req), steering=await self._spec(req),
                                      chat_options=self._chat_options(req), raw_output=True,
                                      monitor=await self._probes(req.monitor) or None)
        prompt = len(out.prompt_token_ids)
        completion = sum(len(c.token_ids) for c in out.outputs)  # OpenAI counts every choice's tokens
        return s.ChatCompletionResponse(
            **self._meta("chatcmpl"), model=name,
            choices=[s.ChatCompletionChoice(index=c.index, message=s.ChatCompletionMessage(content=c.text),
                                            finish_reason=c.finish_reason,
                                            logprobs=self._logprobs(c, req.top_logprobs or 0) if req.logprobs else None,
                                            projections=self._projections(c.projections))
                     for c in out.outputs],
            usage=s.ChatCompletionUsage(prompt_tokens=prompt, completion_tokens=completion,
                                        total_tokens=prompt + completion),
        )

    @staticmethod
    def _logprobs(completion, top: int) -> s.ChoiceLogprobs:
        """OpenAI's ``logprobs.content`` from a ``CompletionOutput``'s per-token ``{id: Logprob}``."""
        def entry(lp):
            token = lp.decoded_token or ""
            # -inf is not JSON; vLLM's server clamps the same way
            return {"token": token, "logprob": max(lp.logprob, -9999.0), "bytes": list(token.encode("utf-8", "replace"))}

        content = []
        for token_id, step in zip(completion.token_ids, completion.logprobs or []):
            best = sorted(step.values(), key=lambda lp: -lp.logprob)[:top]  # the sampled token only if it is among them
            content.append(s.ChatCompletionTokenLogprob(**entry(step[token_id]),
                                                        top_logprobs=[s.TopLogprob(**entry(lp)) for lp in best]))
        return s.ChoiceLogprobs(content=content)

    async def chat_stream(self, req: s.ChatCompletionRequest):
        """Chunks: first the role, then text deltas, then one with the finish reason."""
        name = self.check_model(req.model)
        meta = self._meta("chatcmpl")
        spec = await self._spec(req)
        sampling = self._sampling(req)
        messages = self._messages(req.messages)
        probes = await self._probes(req.monitor)

        def chunk(delta: s.ChatCompletionDelta, finish=None, piece=None):
            extra = {}
            if piece is not None and piece.monitor_header is not None:
                extra["monitor"] = s.MonitorHeader(**piece.monitor_header)
            if piece is not None and piece.projections is not None:
                d = piece.projections
                extra["projections"] = s.ProjectionDeltaBody(start=d.start, values=d.values.tolist(), steered=d.steered,
                                                             tokens=d.tokens)
            return s.ChatCompletionChunk(**meta, model=name, **extra,
                                         choices=[s.ChatCompletionChunkChoice(index=0, delta=delta, finish_reason=finish)])

        yield chunk(s.ChatCompletionDelta(role="assistant", content=""))
        async for piece in self.model.stream_chat(messages, sampling, steering=spec, chat_options=self._chat_options(req),
                                                  monitor=probes or None):
            if piece.finish_reason is not None:
                yield chunk(s.ChatCompletionDelta(), finish=piece.finish_reason, piece=piece)
            elif piece.text or piece.projections is not None or piece.monitor_header is not None:
                yield chunk(s.ChatCompletionDelta(content=piece.text), piece=piece)

    # -- features ------------------------------------------------------------------------------
    @staticmethod
    def _item(feature) -> s.FeatureItem:
        return s.FeatureItem(**feature.to_item())

    async def search(self, req: s.FeatureSearchRequest) -> s.FeatureSearchResponse:
        self.check_model(req.model_name)
        fs = await self.features()
        # a thread: the first search loads the sentence-embedding model, which must not stall other requests
        found = await asyncio.to_thread(fs.search, req.query, req.top_k)
        return s.FeatureSearchResponse(data=[self._item(f) for f in found])

    async def rerank(self, req: s.FeatureRerankRequest) -> s.FeatureRerankResponse:
        self.check_model(req.model_name)
        fs = await self.features()
        ranked = await asyncio.to_thread(fs.rerank, req.query, [f.model_dump() for f in req.features], req.top_k)
        return s.FeatureRerankResponse(data=[s.FeatureItem(**f.to_item()) for f in ranked])

    async def add_concept(self, req: s.ConceptRequest) -> s.ConceptResponse:
        self.check_model(req.model)
        fs = await self.features()
        f = await fs.add_concept(req.label, req.positive, req.negative, req.layer, method=req.method)
        return s.ConceptResponse(feature=self._item(f), method=f.method, scale=f.scale)

    async def load_features(self, req: s.FeatureSetRequest) -> s.FeatureSetResponse:
        name = self.check_model(req.model)
        fs = await self.features()
        return s.FeatureSetResponse(model=name, name=fs.name, count=len(fs), layers=fs.layers())

    async def feature_page(self, req: s.FeaturePageRequest) -> s.FeaturePageResponse:
        from ..features.pages import feature_page

        name = self.check_model(req.model)
        fs = await self.features()
        page = await feature_page(self.model, fs.get(req.feature), req.corpus, top_n=req.top_n, window=req.window,
                                  bins=req.bins, include_library=req.include_library, features=fs)
        return s.FeaturePageResponse(**self._meta("page"), model=name, **page.to_dict())

    async def logit_lens(self, req: s.LogitLensRequest) -> s.LogitLensResponse:
        from ..lens import logit_lens

        name = self.check_model(req.model)
        lens = await logit_lens(self.model, self._messages(req.messages), layers=req.layers, top_k=req.top_k,
                                steering=await self._spec(req), precision=req.precision)
        return s.LogitLensResponse(**self._meta("lens"), model=name, **lens.to_dict())

    async def direction_tokens(self, req: s.DirectionTokensRequest) -> s.DirectionTokensResponse:
        from ..lens import direction_tokens

        name = self.check_model(req.model)
        if (req.feature is None) == (req.vector is None):
            raise ValidationError("give a feature or a vector, not both or neither")
        direction = (await self.features()).get(req.feature) if req.feature is not None else req.vector
        out = direction_tokens(self.model, direction, top_k=req.top_k).to_dict()
        return s.DirectionTokensResponse(**self._meta("lens"), model=name, **out)

    async def best_steering(self, req: s.BestSteeringRequest) -> s.BestSteeringResponse:
        from ..evaluation import best_steering

        self.check_model(req.model)
        fs = await self.features()
        feature = fs.get(req.feature)
        best = await best_steering(self.model, feature, req.prompts, layers=req.layers, strengths=req.strengths,
                                   sampling=SamplingParams(temperature=0.0, max_tokens=req.max_tokens),
                                   repetition_penalties=req.repetition_penalties)
        dial = feature
        if best.layer != feature.layer:  # dials steer a feature at its own layer: register it at the chosen one
            fid = f"{feature.id}@L{best.layer}"
            dial = fs.get(fid) if fid in {f.id for f in fs} else await fs.add_vector(
                f"{feature.label} (layer {best.layer})", feature.direction, best.layer, feature_id=fid)
        keys = ("strength", "repetition_penalty", "concept", "instruction", "fluency", "hm")
        rows = [s.SteeringScoreRow(**{k: float(r[k]) for k in keys}, layer=int(r["layer"])) for r in best.table.to_dict("records")]
        return s.BestSteeringResponse(layer=best.layer, strength=best.strength, repetition_penalty=best.repetition_penalty,
                                      hm=best.hm, feature=self._item(dial), table=rows)

    async def _tokens(self, messages) -> int:
        from ..features.inspection import _render

        return len(_render(self.model, messages))

    async def inspect(self, req: s.FeatureInspectionRequest) -> s.FeatureInspectionResponse:
        name = self.check_model(req.model)
        msgs = self._messages(req.messages)
        fs = await self.features()
        top = await fs.inspect(msgs, top_k=req.top_k or 10, aggregation_method=req.aggregation_method or "mean",
                               interventions=await self._spec(req))
        return s.FeatureInspectionResponse(
            **self._meta("inspect"), model=name,
            features=[s.FeatureInspection(feature=self._item(f), activation=a) for f, a in top],
            usage=s.Usage(total_tokens=await self._tokens(msgs)))

    async def activations(self, req: s.ActivationsRequest) -> s.ActivationsResponse:
        name = self.check_model(req.model)
        msgs = self._messages(req.messages)
        fs = await self.features()
        acts = await fs.activations(msgs, aggregation_method=req.aggregation_method or "mean",
                                    interventions=await self._spec(req))
        return s.ActivationsResponse(**self._meta("activations"), model=name, activations=acts,
                                     usage=s.Usage(total_tokens=await self._tokens(msgs)))

    async def logits(self, req: s.LogitsRequest) -> s.LogitsResponse:
        name = self.check_model(req.model)
        msgs = self._messages(req.messages)
        fs = await self.features()
        out = await fs.logits(msgs, top_k=req.top_k, start_idx=req.start_idx, end_idx=req.end_idx,
                              interventions=await self._spec(req))
        return s.LogitsResponse(**self._meta("logits"), model=name, logits=out,
                                usage=s.Usage(total_tokens=await self._tokens(msgs)))

    async def contrast(self, req: s.ContrastRequest) -> s.ContrastResponse:
        name = self.check_model(req.model)
        d1 = [self._messages(c) for c in req.dataset_1]
        d2 = [self._messages(c) for c in req.dataset_2]
        fs = await self.features()
        add, remove = await fs.contrast(
            d1, d2, k_to_add=req.k_to_add or 10, k_to_remove=req.k_to_remove or 10,
            interventions_1=await self.steering(req.interventions_1), interventions_2=await self.steering(req.interventions_2))
        total = sum([await self._tokens(c) for c in d1 + d2])
        return s.ContrastResponse(**self._meta("contrast"), model=name, top_to_add=[self._item(f) for f in add],
                                  top_to_remove=[self._item(f) for f in remove], usage=s.Usage(total_tokens=total))

    async def token_activations(self, req: s.TokenActivationsRequest) -> s.TokenActivationsResponse:
        name = self.check_model(req.model)
        msgs = self._messages(req.messages)
        fs = await self.features()
        table = await fs.token_table(msgs, req.features, interventions=await self._spec(req))
        return s.TokenActivationsResponse(
            **self._meta("tokens"), model=name, tokens=table["tokens"], message_idx=table["message_idx"],
            features=[self._item(f) for f in table["features"]], activations=table["activations"],
            usage=s.Usage(total_tokens=await self._tokens(msgs)))

    async def norms(self, req: s.NormsRequest) -> s.NormsResponse:
        name = self.check_model(req.model)
        layers = req.layers if req.layers is not None else list(range(self.model.layer_count))
        msgs = self._messages(req.messages)
        _, [handle] = await self.model.chat(msgs, SamplingParams(temperature=0.0, max_tokens=1), capture_layers=layers,
                                            steering=await self._spec(req),
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
