"""The ``workbench`` command: ``prepare`` (convert the default model once), ``serve``, ``smoke``, ``version``.

>>> # shell: workbench prepare
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workbench", description="steering-workbench command line")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="convert the embedded default model to an HF folder (once) and print its path")
    prep.add_argument("--force", action="store_true", help="convert again even if the cache is complete")
    sub.add_parser("version", help="print the version")
    srv = sub.add_parser("serve", help="serve the thin API over HTTP (FastAPI + uvicorn)")
    srv.add_argument("--model", default="default", help="'default', a local HF folder or a hub id")
    srv.add_argument("--backend", default="auto", choices=["auto", "hf", "vllm"])
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=os.environ.get("WORKBENCH_API_KEY"),
                     help="required from clients (default: $WORKBENCH_API_KEY); without it only localhost is served")
    srv.add_argument("--served-model-name", action="append", default=[],
                     help="another name this model answers to (repeatable), e.g. meta-llama/Llama-3.1-8B-Instruct")
    srv.add_argument("--log-level", default="info")
    srv.add_argument("--max-tokens-limit", type=int, default=None,
                     help="refuse requests asking for more new tokens than this (default: the model's context)")
    srv.add_argument("--enforce-eager", action="store_true", help="vllm backend: skip compiled mode (faster start)")
    srv.add_argument("--tensor-parallel-size", type=int, default=None, help="vllm backend: GPUs (or CPU ranks) per model")
    smk = sub.add_parser("smoke", help="chatspace's steering smoke check: does a random vector at one layer change the reply?")
    smk.add_argument("--model-name", default="default", help="'default', a local HF folder or a hub id")
    smk.add_argument("--backend", default="auto", choices=["auto", "hf", "vllm"])
    smk.add_argument("--layer", type=int, required=True, help="0-based decoder block whose output is steered")
    smk.add_argument("--scale", type=float, required=True, help="length of the added random vector")
    smk.add_argument("--max-tokens", type=int, default=32)
    smk.add_argument("--prompt", default=None, help="the raw prompt (default: a question about France)")
    smk.add_argument("--seed", type=int, default=0, help="seed of the random direction")
    smk.add_argument("--enforce-eager", action="store_true", help="vllm backend: skip compiled mode (faster start)")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        from .models import prepare_default_model

        print(prepare_default_model(force=args.force))
    elif args.command == "serve":
        from .server import serve

        extra = {}
        if args.enforce_eager:
            extra["enforce_eager"] = True
        if args.tensor_parallel_size:
            extra["tensor_parallel_size"] = args.tensor_parallel_size
        if extra and args.backend == "hf":
            parser.error("--enforce-eager and --tensor-parallel-size need --backend vllm")
        serve(args.model, backend=args.backend, host=args.host, port=args.port, api_key=args.api_key,
              aliases=args.served_model_name, log_level=args.log_level, max_tokens_limit=args.max_tokens_limit, **extra)
    elif args.command == "smoke":
        from .smoke import PROMPT, main as smoke_main

        args.prompt = args.prompt or PROMPT
        return smoke_main(args)
    elif args.command == "version":
        from . import __version__

        print(__version__)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
