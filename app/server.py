"""`rahf-serve`: load the base, assemble the HTTP app, run uvicorn."""

from __future__ import annotations

import argparse
import logging

from rahf_serve.models import EMBEDDED_ALIAS, load_base


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rahf-serve", description=__doc__)
    p.add_argument("--base", default=EMBEDDED_ALIAS, help="base model: the embedded alias, a Hub id or a directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn
    from fastapi import FastAPI

    base = load_base(args.base, device=args.device, dtype=args.dtype)
    api = FastAPI(title="rahf-serve")

    @api.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "base": base.name}

    uvicorn.run(api, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
