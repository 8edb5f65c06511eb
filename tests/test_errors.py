"""Every bad input raises the documented error naming the value, and the engine keeps serving."""

import pytest
import torch

import workbench as wb

GREEDY = wb.SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
USER = [{"role": "user", "content": "Hello"}]


def _v(n, fill=1.0):
    return torch.full((n,), fill)


CASES = {
    "steering layer out of range": (
        lambda m: m.generate("Hi", GREEDY, steering=wb.SteeringSpec(layers={m.layer_count: [wb.AddSpec(_v(m.hidden_size))]})),
        wb.LayerOutOfRangeError, r"steering layer 4 is out of range; allowed 0..3"),
    "negative layer in set_layer_vector": (
        lambda m: m.set_layer_vector(-1, _v(m.hidden_size)), wb.LayerOutOfRangeError, r"layer_idx -1 is out of range; allowed 0..3"),
    "vector of wrong size": (
        lambda m: m.set_layer_vector(1, _v(m.hidden_size + 3)), wb.VectorError, r"size 67, the model's hidden size is 64"),
    "vector with NaN": (
        lambda m: m.set_layer_vector(1, torch.tensor([float("nan")] * m.hidden_size)), wb.VectorError, r"non-finite value nan at index 0"),
    "vector with inf": (
        lambda m: m.generate("Hi", GREEDY, steering=wb.SteeringSpec(layers={1: [wb.AddSpec(torch.cat([_v(63), torch.tensor([float("inf")])]))]})),
        wb.VectorError, r"non-finite value inf at index 63"),
    "empty prompt": (lambda m: m.generate("", GREEDY), wb.EmptyInputError, r"prompts\[0\] is an empty string"),
    "empty prompt list": (lambda m: m.generate([], GREEDY), wb.EmptyInputError, r"non-empty"),
    "empty messages": (lambda m: m.chat([], GREEDY), wb.EmptyInputError, r"non-empty list"),
    "empty conversation in a batch": (lambda m: m.chat([USER, []], GREEDY), wb.EmptyInputError, r"conversations\[1\]"),
    "only empty contents": (lambda m: m.chat([{"role": "system", "content": ""}, {"role": "user", "content": "  "}], GREEDY),
                            wb.EmptyInputError, r"messages has no text"),
    "unknown role": (lambda m: m.chat([{"role": "wizard", "content": "hi"}], GREEDY), wb.ValidationError, r"unknown role 'wizard'; allowed"),
    "non-string content": (lambda m: m.chat([{"role": "user", "content": 42}], GREEDY), wb.ValidationError, r"content must be a string"),
    "prompt longer than the context": (
        lambda m: m.generate("hello " * 400, GREEDY), wb.PromptTooLongError, r"has \d+ tokens; the context holds 256"),
    "max_tokens zero": (lambda m: m.generate("Hi", max_tokens=0), wb.ValidationError, r"max_tokens=0 is out of range; allowed an integer >= 1"),
    "max_tokens negative": (lambda m: m.chat(USER, max_tokens=-3), wb.ValidationError, r"max_tokens=-3 is out of range"),
    "negative temperature": (lambda m: m.generate("Hi", temperature=-1.0), wb.ValidationError, r"temperature=-1.0 is out of range"),
    "top_p zero": (lambda m: m.generate("Hi", top_p=0.0), wb.ValidationError, r"top_p=0.0 is out of range; allowed \(0.0, 1.0\]"),
    "unknown sampling parameter": (lambda m: m.generate("Hi", temprature=0.5), wb.ValidationError, r"unknown sampling parameter\(s\) \['temprature'\]"),
    "capture of a missing layer": (
        lambda m: m.generate("Hi", GREEDY, capture_layers=[0, 9]), wb.LayerOutOfRangeError, r"capture layer 9 is out of range; allowed 0..3"),
    "pop on an empty stack": (lambda m: m.pop_steering_spec(), wb.SteeringStackEmptyError, r"stack is empty"),
    "prefill without an assistant message": (
        lambda m: m.chat(USER, GREEDY, chat_options={"continue_final_message": True}), wb.ValidationError, r"last message to be an assistant"),
    "chat option the workbench controls": (
        lambda m: m.chat(USER, GREEDY, chat_options={"tokenize": True}), wb.ValidationError, r"chat_options \['tokenize'\] cannot be set"),
    "chat options not a dict": (lambda m: m.chat(USER, GREEDY, chat_options=["x"]), wb.ValidationError, r"chat_options must be a dict"),
    "steering of the wrong type": (lambda m: m.generate("Hi", GREEDY, steering="pirate"), wb.ValidationError, r"got str"),
    "token id outside the vocabulary": (lambda m: m.generate([1, 2, 99999], GREEDY), wb.ValidationError, r"token id 99999 outside 0..399"),
    "wrong number of per-prompt specs": (
        lambda m: m.generate(["a", "b"], GREEDY, steering=[wb.SteeringSpec()]), wb.ValidationError, r"1 steering specs for 2 prompts"),
}


@pytest.fixture(scope="module")
async def reference(tiny):
    return await tiny.generate("Hello there", GREEDY)


@pytest.mark.parametrize("name", list(CASES))
async def test_bad_input_raises_and_engine_keeps_serving(tiny, reference, name):
    call, error, match = CASES[name]
    with pytest.raises(error, match=match):
        await call(tiny)
    assert isinstance(error("x"), wb.WorkbenchError)
    assert tiny.export_steering_spec().is_empty()
    assert await tiny.generate("Hello there", GREEDY) == reference


async def test_closed_model_refuses_requests(tiny_dir):
    model = wb.load(str(tiny_dir))
    assert await model.generate("Hi", GREEDY)
    model.close()
    with pytest.raises(wb.EngineError, match="closed"):
        await model.generate("Hi", GREEDY)


def test_unknown_model_and_backend():
    with pytest.raises(wb.ModelNotFoundError, match=r"cannot find model 'no-such-model'. Tried: no local folder"):
        wb.resolve_model("no-such-model")
    with pytest.raises(wb.ValidationError, match=r"backend 'tpu' is unknown; allowed"):
        wb.load("default", backend="tpu")


def test_hub_id_resolves_from_the_hugging_face_cache(tiny_dir, tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import constants

    snap = tmp_path / "hub" / "models--someone--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_dir, snap)
    (tmp_path / "hub" / "models--someone--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-llama" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert wb.resolve_model("someone/tiny-llama") == snap
    with pytest.raises(wb.ModelNotFoundError, match=r"cannot find model 'someone/missing'. Tried: .*Hugging Face cache"):
        wb.resolve_model("someone/missing")
