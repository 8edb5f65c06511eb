"""``wb.load``: pick a backend and return a ready ``SteerModel``."""

from __future__ import annotations


from ..errors import ValidationError
from ..models import canonical_name, resolve_model

BACKENDS = ("auto", "hf", "vllm")


def _vllm_usable() -> bool:
    from .vllm import vllm_available

    if not vllm_available():
        return False
    import torch

    return torch.cuda.is_available()


def load(name: str = "default", backend: str = "auto", *, device=None, dtype=None, max_model_len: int | None = None,
         max_batch_size: int = 64, prefix_cache_mb: float = 256, **backend_kwargs):
    """Load a model for steering: ``"default"`` (SmolLM2-135M-Instruct), a local HF folder, or a hub id.

    ``backend="auto"`` picks vLLM when it is installed and a GPU is present, else ``hf``.
    ``backend="vllm"`` takes the options of ``workbench.engine.vllm.load_vllm`` (``enforce_eager``,
    ``tensor_parallel_size``, ``max_specs``, ``max_ops_per_layer``, ...) and vLLM's ``EngineArgs``.
    ``prefix_cache_mb`` bounds the KV kept for reusing prompt prefixes (0 turns it off); entries are
    keyed by the steering spec, so a prefix computed under one spec never serves another.

    >>> import workbench as wb
    >>> model = wb.load("default")  # doctest: +SKIP
    >>> model.backend, model.layer_count, model.hidden_size  # doctest: +SKIP
    ('hf', 30, 576)
    """
    if backend not in BACKENDS:
        raise ValidationError(f"backend {backend!r} is unknown; allowed: {list(BACKENDS)}")
    if backend == "auto":
        backend = "vllm" if _vllm_usable() else "hf"
    path = resolve_model(name)
    if backend == "vllm":
        from .vllm import load_vllm

        return load_vllm(path, canonical_name(name), device=device, dtype=dtype, max_model_len=max_model_len,
                         max_batch_size=max_batch_size, **backend_kwargs)
    if backend_kwargs:
        raise ValidationError(f"unknown options for the hf backend: {sorted(backend_kwargs)}")
    from .hf import load_hf

    return load_hf(path, canonical_name(name), device=device, dtype=dtype, max_model_len=max_model_len,
                   max_batch_size=max_batch_size, prefix_cache_mb=prefix_cache_mb)
