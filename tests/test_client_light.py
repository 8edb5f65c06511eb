"""vllm-sdk users' code with only the import changed: a light client (no torch), the env-var server
address, the schema names, one InterventionSpec, and a sync Client that holds its connections."""

import asyncio
import gc
import inspect
import os
import subprocess
import sys

import pydantic
import pytest
import vllm_sdk
import vllm_sdk.schemas as sdk
import vllm_sdk.variant as sdk_variant

import workbench as wb
from workbench.api import schemas as ours

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
HELLO = [{"role": "user", "content": "Say hello in one sentence."}]
KEY = "light-client-key"
HEAVY = ("torch", "transformers", "numpy", "pandas", "workbench.engine", "workbench.api.handlers")


def run_python(code: str, **env) -> str:
    """Run ``code`` in a fresh interpreter (nothing imported yet); return its stdout, fail with its stderr."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_client_imports_and_runs_without_torch(http_server):
    """The README's imports, a Variant with interventions, and real calls to a server: no torch in the process."""
    out = run_python(f"""
import asyncio, sys
from workbench import AsyncClient, ChatMessage, Client, ModelName, Variant
from workbench.api.schemas import ChatCompletionChunk, InterventionSpec
import workbench.api
from workbench.api import AsyncClient as A, Client as C

variant = Variant(ModelName.META_LLAMA_3_1_8B_INSTRUCT).add_intervention(0, 0.0)
assert variant.model_name == {LLAMA!r} and isinstance(variant.interventions[0], InterventionSpec)

async def main():
    async with AsyncClient(api_key="x") as client:
        reply = await client.chat.completions.create(model=variant, max_completion_tokens=4, temperature=0.0,
                                                     messages=[ChatMessage(role="user", content="Hi")])
        chunks = [c async for c in client.chat.completions.create_stream(model={LLAMA!r}, max_completion_tokens=4,
                                                                           messages=[{{"role": "user", "content": "Hi"}}])]
        return reply, chunks

reply, chunks = asyncio.run(main())
assert reply.choices[0].message.content and all(isinstance(c, ChatCompletionChunk) for c in chunks)
with Client(api_key="x") as client:
    assert client.features.search("pirate", model={LLAMA!r}, top_k=2).data
heavy = [m for m in {HEAVY!r} if m in sys.modules]
print("heavy:", heavy)
""", WORKBENCH_BASE_URL=http_server)
    assert out.strip() == "heavy: []"


def test_every_public_name_resolves_lazily():
    """In a fresh interpreter every name of ``__all__`` (and ``wb.plots``) loads on first use, and ``dir`` lists them."""
    out = run_python("""
import sys
import workbench as wb, workbench.api as api, workbench.features as features
assert "torch" not in sys.modules
for module in (wb, api, features):
    missing = [n for n in module.__all__ if getattr(module, n, None) is None]
    assert not missing, (module.__name__, missing)
    assert set(module.__all__) <= set(dir(module)), set(module.__all__) - set(dir(module))
assert wb.plots.__name__ == "workbench.plots" and callable(wb.load) and isinstance(wb.SteeringSpec, type)
assert wb.InterventionSpec is wb.features.InterventionSpec is api.schemas.InterventionSpec
try:
    wb.no_such_name
except AttributeError as exc:
    assert "no_such_name" in str(exc)
else:
    raise AssertionError("an unknown name must raise AttributeError")
print("ok", len(wb.__all__))
""")
    assert out.startswith("ok")
    assert len(set(wb.__all__)) == len(wb.__all__)


def test_vllm_sdk_names_import_from_workbench():
    """Every vllm-sdk schema name is in ``workbench.api.schemas``, and its top-level names in ``workbench``."""
    sdk_schema_names = {n for n, v in vars(sdk).items() if not n.startswith("_") and getattr(v, "__module__", None) == sdk.__name__}
    sdk_schema_names.add("RoleLiteral")
    # the attribute route is not in the seed README (and not served here)
    missing = {n for n in sdk_schema_names if not n.startswith("FeatureAttribute") and not hasattr(ours, n)}
    assert not missing, missing
    readme = ("ModelName RoleLiteral InterventionSpec ChatMessage ChatCompletionRequest ChatCompletionMessage "
              "ChatCompletionChoice ChatCompletionUsage ChatCompletionResponse ChatCompletionDelta ChatCompletionChunkChoice "
              "ChatCompletionChunk FeatureItem FeatureSearchRequest FeatureSearchResponse FeatureRerankRequest "
              "FeatureRerankResponse FeatureInspectionRequest FeatureInspectionResponse FeatureInspection ActivationsRequest "
              "ActivationsResponse LogitsRequest LogitsResponse ContrastRequest ContrastResponse").split()
    assert all(hasattr(ours, n) for n in readme)
    top = [n for n in vllm_sdk.__all__ if not n.startswith("VLLM")]
    assert [n for n in top if not hasattr(wb, n)] == []
    assert set(top) <= set(wb.__all__) | {"InterventionSpec"}
    assert [m.value for m in ours.ModelName] == [m.value for m in sdk.ModelName]
    assert ours.RoleLiteral == sdk.RoleLiteral


def test_one_intervention_spec_everywhere_and_its_wire_form():
    iv = wb.InterventionSpec(3, 0.5)
    assert type(wb.Variant("default").add_intervention(3, 0.5).interventions[0]) is wb.InterventionSpec
    from workbench.features import variant

    assert variant.InterventionSpec is ours.InterventionSpec is wb.InterventionSpec
    # the body vllm-sdk sends and its schema parses: no feature_id unless one is set
    assert iv.model_dump() == iv.to_dict() == sdk.InterventionSpec(index_in_sae=3, strength=0.5).model_dump()
    assert sdk.InterventionSpec.model_validate_json(iv.model_dump_json()).model_dump() == iv.model_dump()
    req = ours.ChatCompletionRequest(model=LLAMA, messages=HELLO, interventions=[iv])
    assert '"feature_id"' not in req.model_dump_json() and "feature_id" not in req.model_dump()["interventions"][0]
    named = wb.Variant("default").set({"id": "concept/pirate", "index_in_sae": 7}, 0.4, mode="clamp")
    assert named.get_interventions() == [{"index_in_sae": 7, "strength": 0.4, "mode": "clamp", "feature_id": "concept/pirate"}]
    assert ours.InterventionSpec.model_validate(named.get_interventions()[0]) == named.interventions[0]
    # a vllm-sdk server ignores the extra key
    sdk.ChatCompletionRequest.model_validate_json(
        ours.ChatCompletionRequest(model=LLAMA, messages=HELLO, interventions=named.interventions).model_dump_json())
    # by name (vllm-sdk's schema), by position (its Variant helper), or converted from either of its classes
    assert ours.InterventionSpec(index_in_sae=3, strength=0.5, mode=None) == iv
    assert ours.InterventionSpec.from_any(sdk_variant.InterventionSpec(3, 0.5, "add")) == iv
    assert ours.InterventionSpec.from_any(sdk.InterventionSpec(index_in_sae=3, strength=0.5)) == iv
    assert wb.Variant("default").add_interventions([sdk_variant.InterventionSpec(3, 0.5), {"index_in_sae": 4, "strength": 1}]) \
        .get_interventions() == [iv.to_dict(), {"index_in_sae": 4, "strength": 1.0, "mode": "add"}]


async def test_feature_id_on_the_wire_picks_the_feature(default_model):
    """A Variant's feature id reaches the server, which steers that feature (not whatever its index names)."""
    client = wb.AsyncClient(default_model, aliases=[LLAMA])
    pirate = default_model.features["concept/pirate"]
    tokyo = [{"role": "user", "content": "Give me tourist information about Tokyo."}]
    kw = dict(model=LLAMA, messages=tokyo, max_completion_tokens=16, temperature=0.0)
    by_variant = await client.chat.completions.create(**{**kw, "model": wb.Variant("default").set(pirate, 0.5)})
    by_id = await client.chat.completions.create(**kw, interventions=[
        wb.InterventionSpec(index_in_sae=pirate.index_in_sae + 1, strength=0.5, feature_id="concept/pirate")])
    plain = await client.chat.completions.create(**kw)
    assert by_id.choices[0].message.content == by_variant.choices[0].message.content != plain.choices[0].message.content


@pytest.mark.parametrize("kwargs, match", [
    ({"index_in_sae": True, "strength": 0.5}, "index_in_sae must be an integer"),
    ({"index_in_sae": 2.0, "strength": 0.5}, "index_in_sae must be an integer"),
    ({"index_in_sae": "2", "strength": 0.5}, "index_in_sae must be an integer"),
    ({"index_in_sae": 2, "strength": float("inf")}, "strength must be finite"),
    ({"index_in_sae": 2, "strength": "big"}, "strength must be a number"),
    ({"index_in_sae": 2, "strength": 0.5, "mode": "boost"}, r"mode 'boost' is not allowed; allowed: \['add', 'clamp'\]"),
    ({"strength": 0.5}, "index_in_sae: Field required"),
])
def test_intervention_spec_validation(kwargs, match):
    with pytest.raises(wb.ValidationError, match=match):
        wb.InterventionSpec(**kwargs)
    # on the wire the same rules give pydantic's error (a 422), with the same words
    with pytest.raises(pydantic.ValidationError, match=match.split(":")[0]):
        ours.ChatCompletionRequest.model_validate({"model": LLAMA, "messages": HELLO, "interventions": [kwargs]})


def test_default_server_address_is_where_serve_listens(monkeypatch):
    from workbench.api.client import DEFAULT_BASE_URL
    from workbench.server import serve

    monkeypatch.delenv("WORKBENCH_BASE_URL", raising=False)
    monkeypatch.delenv("WORKBENCH_API_KEY", raising=False)
    params = inspect.signature(serve).parameters
    assert DEFAULT_BASE_URL == f"http://{params['host'].default}:{params['port'].default}" == "http://127.0.0.1:8000"
    assert wb.AsyncClient(api_key="x")._transport.base_url == "http://127.0.0.1:8000"
    with wb.Client() as client:
        assert client._transport.base_url == "http://127.0.0.1:8000"


def test_bad_client_arguments_say_what_to_pass(default_model, http_server):
    with pytest.raises(wb.ValidationError, match="pass base_url= and api_key= by name"):
        wb.AsyncClient("sk-some-key")
    with pytest.raises(wb.ValidationError, match="not both"):
        wb.AsyncClient(default_model, base_url=http_server)


@pytest.fixture(scope="module")
def keyed_server(default_model):
    """A uvicorn server that wants the key ``KEY`` (the shared default model, a Llama alias)."""
    from conftest import serve_in_thread
    from workbench.server import create_app

    yield from serve_in_thread(create_app(default_model, aliases=[LLAMA], api_key=KEY))


async def test_env_vars_give_the_server_and_the_key(keyed_server, monkeypatch):
    """``AsyncClient(api_key=...)`` / ``Client()`` with no base_url reach ``$WORKBENCH_BASE_URL`` with ``$WORKBENCH_API_KEY``."""
    monkeypatch.setenv("WORKBENCH_BASE_URL", keyed_server)
    monkeypatch.delenv("WORKBENCH_API_KEY", raising=False)
    with pytest.raises(wb.APIValidationError) as info:   # no key at all: refused, so the server checks keys
        await wb.AsyncClient().models()
    assert info.value.status_code == 401
    client = wb.AsyncClient(api_key=KEY)
    r = await client.chat.completions.create(model=LLAMA, messages=HELLO, max_completion_tokens=4, temperature=0.0)
    assert r.choices[0].message.content
    await client.close()
    monkeypatch.setenv("WORKBENCH_API_KEY", KEY)
    assert LLAMA in [m.id for m in (await wb.AsyncClient().models()).data]
    with wb.Client() as sync_client:
        assert sync_client.features.search("pirate", model=LLAMA, top_k=1).data[0].id == "concept/pirate"
    with pytest.raises(wb.APIValidationError) as info:   # a key given explicitly wins over the environment
        await wb.AsyncClient(api_key="wrong").models()
    assert info.value.status_code == 401


async def test_base_url_still_wins_over_the_environment(http_server, monkeypatch):
    from conftest import free_port

    monkeypatch.setenv("WORKBENCH_BASE_URL", f"http://127.0.0.1:{free_port()}")   # nothing listens there
    assert (await wb.AsyncClient(base_url=http_server).models()).data[1].id == LLAMA
    with pytest.raises(wb.APIConnectionError, match="cannot reach"):
        await wb.AsyncClient(api_key="x").models()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_sync_client_over_http_does_not_leak_connections(http_server):
    """1,000 sync calls hold a bounded number of file descriptors (one pooled connection, not one per call)."""
    client = wb.Client(base_url=http_server)
    assert client.models().data[0].id == "HuggingFaceTB/SmolLM2-135M-Instruct"   # warm: the pool and the server are up
    gc.collect()
    before = open_fds()
    for i in range(1000):
        if i % 2:
            client.models()
        else:
            assert client.features.search("pirate", model=LLAMA, top_k=1).data
    gc.collect()
    grown = open_fds() - before
    assert grown <= 8, f"{grown} file descriptors more after 1,000 calls"
    client.close()


async def test_async_client_driven_by_asyncio_run_does_not_leak(http_server):
    """One AsyncClient used from many short-lived loops (``asyncio.run`` per call) keeps no sockets of dead loops."""
    client = wb.AsyncClient(base_url=http_server)

    def one_call():  # a fresh loop per call, as a script calling asyncio.run in a loop does
        return asyncio.run(client.models())

    await asyncio.to_thread(one_call)
    gc.collect()
    before = open_fds()
    for _ in range(200):
        assert (await asyncio.to_thread(one_call)).data
    gc.collect()
    grown = open_fds() - before
    assert grown <= 8, f"{grown} file descriptors more after 200 calls on fresh loops"
    assert len(client._transport._clients) <= 1


def test_sync_methods_mirror_the_async_ones_with_real_signatures(default_model):
    """Tab completion and help() see real methods: the sync client's match the async client's, name for name."""
    client = wb.Client(default_model, aliases=[LLAMA])
    for sync_obj, async_obj in ((client.features, client.async_client.features),
                                (client.chat.completions, client.async_client.chat.completions)):
        names = {n for n in dir(type(async_obj)) if not n.startswith("_")}
        assert names and names == {n for n in dir(type(sync_obj)) if not n.startswith("_")}
        for name in names:
            sync_m, async_m = getattr(sync_obj, name), getattr(async_obj, name)
            assert inspect.signature(sync_m).parameters == inspect.signature(async_m).parameters, name
            assert not inspect.iscoroutinefunction(sync_m) and sync_m.__doc__, name
    assert list(inspect.signature(client.features.logits).parameters)[:2] == ["messages", "model"]
    stream = client.chat.completions.create_stream(model=LLAMA, messages=HELLO, max_completion_tokens=3, temperature=0.0)
    assert hasattr(stream, "__next__") and not hasattr(stream, "__anext__")
    assert "".join(c.choices[0].delta.content or "" for c in stream) == \
        client.chat.completions.create(LLAMA, HELLO, max_completion_tokens=3, temperature=0.0).choices[0].message.content
    assert isinstance(client.async_client, wb.AsyncClient)
