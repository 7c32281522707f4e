"""Hardening fixtures: the serving suite's tiny base, adapters, runtime and live server, reused as is."""

from __future__ import annotations

# Imported so pytest registers them here too; one definition of the test server for both suites.
from tests.serving.conftest import (  # noqa: F401
    LiveServer,
    adapter_dir,
    client,
    lively_model_dir,
    load_lively,
    runtime,
    server,
)
