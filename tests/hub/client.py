"""Runs `rahf_serve.hub` calls in a fresh interpreter: `python -m tests.hub.client '<json list of calls>'`.

huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE once, at import, so each
environment a test needs gets its own process instead of any patching of the client. Prints one
JSON line: a result per call, errors included (as class name, status, code and message).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rahf_serve.bundle import read_bundle
from rahf_serve.errors import RahfError
from rahf_serve.hub import download_bundle, push_bundle
from rahf_serve.sources import resolve_source


def run(call: dict[str, Any]) -> dict[str, Any]:
    if call["fn"] == "push":
        return {"url": push_bundle(call["bundle"], call["repo_id"], **call.get("kwargs", {}))}
    if call["fn"] == "download":
        path = download_bundle(call["spec"], call.get("cache_dir"))
    elif call["fn"] == "resolve":
        path = resolve_source(call["spec"])
    else:
        raise ValueError(f"unknown call {call['fn']!r}")
    bundle = read_bundle(path)
    return {"path": str(path), "has_steering": bundle.has_steering, "files": sorted(p.name for p in path.iterdir())}


def main() -> None:
    results = []
    for call in json.loads(sys.argv[1]):
        try:
            results.append({"ok": True, **run(call)})
        except RahfError as err:
            results.append({"ok": False, "error": type(err).__name__, "status": err.status, "code": err.code,
                            "message": str(err)})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
