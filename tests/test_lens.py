"""Logit lens and direction unembedding, checked against the model's own readout; over both API transports."""

import pytest
import torch
from conftest import reference_hidden

import workbench as wb
from workbench.lens import Unembedding

CHAT = [{"role": "user", "content": "The capital of France is Paris. The capital of Italy is"}]


def _ids(model, messages):
    from workbench.chat import check_chat_options, render_chat

    return render_chat(model.tokenizer, messages, check_chat_options({"add_generation_prompt": False})).token_ids


# how far "fast" probabilities may be from float32 ones, relative: the normaliser's tail comes from
# bfloat16 logits (benchmarks/lens_bench.py measured <= 0.6 % over 6000 rows)
FAST = {"rtol": 1e-2, "atol": 1e-6}


@pytest.mark.parametrize("precision", ["exact", "fast"])
async def test_last_layer_lens_is_the_models_own_next_token(default_model, precision):
    lens = await wb.logit_lens(default_model, CHAT, top_k=3, precision=precision)
    ids = _ids(default_model, CHAT)
    assert lens.token_ids == ids and lens.layers == list(range(default_model.layer_count))
    with torch.no_grad():
        logits = default_model.hf_model(input_ids=torch.tensor([ids])).logits[0]
    want = logits.argmax(-1)
    assert lens.top_ids[-1, :, 0].tolist() == want.tolist()
    tol = {"rtol": 1e-4, "atol": 1e-4} if precision == "exact" else FAST
    torch.testing.assert_close(lens.top_probs[-1, :, 0], torch.softmax(logits.float(), -1).max(-1).values, **tol)
    assert (lens.top_probs[..., :-1] >= lens.top_probs[..., 1:]).all()   # ranked


async def test_fast_lens_ranks_like_float32_at_every_layer(default_model):
    """bfloat16 only proposes: the fast lens's ids and order are the float32 readout's everywhere."""
    exact = await wb.logit_lens(default_model, CHAT, top_k=5, precision="exact")
    fast = await wb.logit_lens(default_model, CHAT, top_k=5, precision="fast")
    assert torch.equal(fast.top_ids, exact.top_ids)
    torch.testing.assert_close(fast.top_probs, exact.top_probs, **FAST)
    assert (fast.top_probs != exact.top_probs).any()     # it did take the bfloat16 path


async def test_the_readout_runs_off_the_event_loop(default_model, monkeypatch):
    """The readout (0.5-2 s) runs in a worker thread: a kernel's or server's loop keeps streaming meanwhile."""
    import threading

    seen = []
    real = Unembedding.top_k
    monkeypatch.setattr(Unembedding, "top_k", lambda self, *a, **k: (seen.append(threading.get_ident()),
                                                                     real(self, *a, **k))[1])
    await wb.logit_lens(default_model, CHAT, layers=[29], top_k=1)
    assert seen and seen[0] != threading.get_ident()


def _toy_readout(vocab: int, hidden: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = Unembedding(1 + 0.1 * torch.randn(hidden, generator=g), torch.randn(vocab, hidden, generator=g), 1e-6)
    rows = lens.normed(torch.randn(300, hidden, generator=g) * 3)
    return lens, rows


@pytest.mark.parametrize("vocab", [4096, 1000])    # 64-token blocks; and a vocab they do not divide
def test_fast_readout_matches_float32_on_a_toy_head(vocab):
    lens, rows = _toy_readout(vocab)
    ids_exact, probs_exact = lens.top_k(rows, 5, precision="exact")
    ids_fast, probs_fast = lens.top_k(rows, 5, precision="fast")      # 300 rows: chunks of 128 and a rest
    assert torch.equal(ids_fast, ids_exact)
    torch.testing.assert_close(probs_fast, probs_exact, **FAST)
    torch.testing.assert_close(probs_exact, torch.softmax(rows @ lens.head.T, -1).topk(5).values, rtol=0, atol=1e-6)


def test_rows_the_candidates_cannot_vouch_for_are_read_out_in_float32():
    """No margin: every row's candidates leave doubt, so every row is redone in float32."""
    lens, rows = _toy_readout(4096, seed=1)
    ids_exact, probs_exact = lens.top_k(rows, 5, precision="exact")
    ids, probs = lens._top_k_fast(rows, 5, margin=0)
    assert torch.equal(ids, ids_exact)
    torch.testing.assert_close(probs, probs_exact, rtol=0, atol=1e-6)
    ids, probs = lens._top_k_fast(rows, 5, margin=16)
    assert not torch.allclose(probs, probs_exact, rtol=0, atol=1e-7)   # with a margin most rows stay fast


@pytest.mark.parametrize("fast_hardware", [True, False])
def test_auto_precision_is_fast_only_with_bf16_hardware(monkeypatch, fast_hardware):
    import workbench.lens as lens_module

    lens, rows = _toy_readout(4096, seed=2)
    monkeypatch.setattr(lens_module, "bf16_matmul_is_fast", lambda: fast_hardware)
    want = lens.top_k(rows, 3, precision="fast" if fast_hardware else "exact")
    got = lens.top_k(rows, 3, precision="auto")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


async def test_an_intermediate_layer_is_norm_then_unembedding_of_its_stream(default_model):
    ids = _ids(default_model, CHAT)
    lens = await wb.logit_lens(default_model, CHAT, layers=[4, 12], top_k=5)
    ref, _ = reference_hidden(default_model, ids, [12])
    hf = default_model.hf_model
    with torch.no_grad():
        want = hf.lm_head(hf.model.norm(ref[12][None].to(hf.dtype)))[0].float()
    assert lens.layers == [4, 12]
    assert lens.top_ids[1].tolist() == torch.topk(want, 5, dim=-1).indices.tolist()
    table = lens.table()
    assert len(table) == 2 * len(ids) * 5 and set(table.layer) == {4, 12}
    assert "<table" in lens._repr_html_()


def test_direction_tokens_rank_the_readout_of_the_direction(default_model):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(default_model.hidden_size, generator=g)
    dt = wb.direction_tokens(default_model, v, top_k=8)
    u = Unembedding.of(default_model)
    scores = u.head @ (u.norm_weight * v / v.norm())
    assert dt.promoted.token_id.tolist() == torch.topk(scores, 8).indices.tolist()
    assert dt.suppressed.token_id.tolist() == torch.topk(-scores, 8).indices.tolist()
    flipped = wb.direction_tokens(default_model, -v, top_k=8)
    assert flipped.promoted.token_id.tolist() == dt.suppressed.token_id.tolist()
    assert dt.promoted.token.tolist() == [default_model.tokenizer.decode([i]) for i in dt.promoted.token_id]
    with pytest.raises(wb.VectorError):
        wb.direction_tokens(default_model, torch.ones(3))
    with pytest.raises(wb.ValidationError):
        wb.direction_tokens(default_model, v, top_k=0)


async def test_lens_errors(default_model):
    with pytest.raises(wb.LayerOutOfRangeError):
        await wb.logit_lens(default_model, "Hi", layers=[99])
    with pytest.raises(wb.ValidationError):
        await wb.logit_lens(default_model, "Hi", top_k=0)
    with pytest.raises(wb.ValidationError, match="precision"):
        await wb.logit_lens(default_model, "Hi", precision="bf16")


@pytest.fixture(scope="module", params=["inprocess", "http"])
def client(request, default_model):
    if request.param == "inprocess":
        return wb.AsyncClient(default_model)
    return wb.AsyncClient(base_url=request.getfixturevalue("http_server"))


async def test_api_lenses_are_the_kernel_lenses(client, default_model):
    want = await wb.logit_lens(default_model, CHAT, layers=[3, 29], top_k=2)
    got = await client.lens.logit(CHAT, model="default", layers=[3, 29], top_k=2)
    assert got.top_ids == want.top_ids.tolist() and got.top_tokens == want.top_tokens and got.tokens == want.tokens
    exact = await wb.logit_lens(default_model, CHAT, layers=[3, 29], top_k=2, precision="exact")
    got = await client.lens.logit(CHAT, model="default", layers=[3, 29], top_k=2, precision="exact")
    assert got.top_ids == exact.top_ids.tolist() and got.top_probs == exact.top_probs.tolist()
    with pytest.raises(wb.APIValidationError, match="precision"):
        await client.lens.logit(CHAT, model="default", precision="bf16")
    await default_model.load_features()
    pirate = default_model.features["concept/pirate"]
    d = await client.lens.direction(model="default", feature="concept/pirate", top_k=5)
    assert [t.token_id for t in d.promoted] == wb.direction_tokens(default_model, pirate, 5).promoted.token_id.tolist()
    v = torch.randn(default_model.hidden_size, generator=torch.Generator().manual_seed(1))
    dv = await client.lens.direction(model="default", vector=v, top_k=5)
    assert [t.token_id for t in dv.suppressed] == wb.direction_tokens(default_model, v, 5).suppressed.token_id.tolist()
    for bad in ({}, {"feature": "concept/pirate", "vector": v}):
        with pytest.raises(wb.APIValidationError, match="not both or neither"):
            await client.lens.direction(model="default", top_k=5, **bad)
    with pytest.raises(wb.APIValidationError, match="hidden size"):
        await client.lens.direction(model="default", vector=[1.0, 2.0])


def test_sync_client_lens(default_model):
    c = wb.Client(default_model)
    r = c.lens.logit(CHAT, model="default", layers=[29], top_k=1)
    assert len(r.top_ids[0]) == len(r.tokens)


async def test_vllm_lenses_read_the_same_weights_and_streams_as_hf(vllm_model, default_model):
    """On vLLM the readout comes from the folder's safetensors and the stream from the workers: same lens."""
    u_vllm, u_hf = Unembedding.of(vllm_model), Unembedding.of(default_model)
    assert u_vllm is not u_hf
    torch.testing.assert_close(u_vllm.head, u_hf.head, rtol=0, atol=0)
    torch.testing.assert_close(u_vllm.norm_weight, u_hf.norm_weight, rtol=0, atol=0)
    assert u_vllm.eps == pytest.approx(u_hf.eps)
    # exact readouts: this compares the engines' streams, not the readout's precision
    got = await wb.logit_lens(vllm_model, CHAT, layers=[12, 29], top_k=3, precision="exact")
    want = await wb.logit_lens(default_model, CHAT, layers=[12, 29], top_k=3, precision="exact")
    assert got.token_ids == want.token_ids and got.layers == [12, 29]
    agree = (got.top_ids[..., 0] == want.top_ids[..., 0]).float().mean().item()
    assert agree >= 0.95, agree       # the two engines' streams agree to ~1e-4 (test_engine_contract)
    assert got.top_ids[-1, -1, 0] == want.top_ids[-1, -1, 0]
    torch.testing.assert_close(got.top_probs[..., 0], want.top_probs[..., 0], rtol=0, atol=2e-3)
    dt_vllm = wb.direction_tokens(vllm_model, u_hf.head[0], top_k=5)
    dt_hf = wb.direction_tokens(default_model, u_hf.head[0], top_k=5)
    assert dt_vllm.promoted.token_id.tolist() == dt_hf.promoted.token_id.tolist()
