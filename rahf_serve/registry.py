"""The adapter registry: which adapters are served under which names, and where they came from.

It enforces the loading policy (valid names, one load per name at a time, local paths from the API
only inside the adapter directory) and reads bundles on the caller's thread; the engine only
attaches the already-validated bundle between two steps.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bundle import CONFIG_FILE, Bundle, read_bundle
from .engine import Engine
from .errors import (
    AdapterConflict,
    BundleNotFound,
    InvalidAdapterName,
    ModelNotFound,
    RahfError,
    SourceNotAllowed,
)
from .sources import exists, is_hub_spec, resolve_source

log = logging.getLogger(__name__)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate_name(name: str) -> str:
    """Adapter names are single path-free tokens: letters, digits, '_', '-', '.', no '..'."""
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        raise InvalidAdapterName(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter "
            "or digit, without '..' or path separators")
    return name


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    source: str
    path: Path
    bundle: Bundle
    loaded_at: float

    def describe(self) -> dict[str, Any]:
        manifest = self.bundle.manifest or {}
        return {"name": self.name, "source": self.source, "rank": self.bundle.rank,
                "method": manifest.get("method"), "steering_layers": sorted(self.bundle.vectors),
                "base": self.bundle.base_id, "loaded_at": int(self.loaded_at)}


class AdapterRegistry:
    def __init__(self, engine: Engine, adapter_dir: str | Path = "adapters") -> None:
        self.engine = engine
        self.adapter_dir = Path(adapter_dir)
        self._adapters: dict[str, AdapterInfo] = {}
        self._busy: set[str] = set()
        """names being loaded or unloaded right now: the per-name lock"""
        self._lock = threading.Lock()

    def list(self) -> list[AdapterInfo]:
        return sorted(self._adapters.values(), key=lambda a: a.name)

    def get(self, name: str) -> AdapterInfo:
        if name not in self._adapters:
            raise ModelNotFound(f"adapter {name!r} is not loaded")
        return self._adapters[name]

    def load(self, name: str, source: str, *, confined: bool = False) -> AdapterInfo:
        """Load `source` as `name`. `confined` (the API) allows local paths only inside the adapter dir."""
        validate_name(name)
        with self._lock:
            if name in self._adapters or name in self._busy:
                raise AdapterConflict(f"an adapter named {name!r} is already loaded; DELETE it first")
            self._busy.add(name)
        try:
            path = self._resolve(source) if confined else resolve_source(source)
            started = time.perf_counter()
            bundle = read_bundle(path)
            self.engine.attach_adapter(name, bundle)
            log.info("loaded adapter %s from %s in %.2f s", name, source, time.perf_counter() - started)
            info = AdapterInfo(name, source, path, bundle, time.time())
            self._adapters[name] = info
            return info
        finally:
            with self._lock:
                self._busy.discard(name)

    def unload(self, name: str) -> None:
        with self._lock:
            if name in self._busy:
                raise AdapterConflict(f"adapter {name!r} is being loaded or unloaded; retry")
            if name not in self._adapters:
                raise ModelNotFound(f"adapter {name!r} is not loaded")
            self._busy.add(name)
        try:
            self.engine.detach_adapter(name)
            del self._adapters[name]
        finally:
            with self._lock:
                self._busy.discard(name)

    def load_dir(self) -> list[AdapterInfo]:
        """Load every bundle folder in the adapter dir under its folder name; a bad one is logged, skipped."""
        if not self.adapter_dir.is_dir():
            return []
        loaded = []
        for folder in sorted(p for p in self.adapter_dir.iterdir() if (p / CONFIG_FILE).is_file()):
            try:
                loaded.append(self.load(folder.name, str(folder)))
            except RahfError as err:
                log.warning("skipping %s: %s", folder, err)
        return loaded

    def _resolve(self, source: str) -> Path:
        """A local path inside the adapter dir (symlinks resolved), or a Hub download."""
        root = self.adapter_dir.resolve()
        candidate = Path(source) if Path(source).is_absolute() else self.adapter_dir / source
        found = exists(candidate)
        if not found and is_hub_spec(source) and not Path(source).is_absolute():
            return resolve_source(source)
        if not found:
            raise BundleNotFound(f"adapter source {source!r} is neither a folder in {self.adapter_dir} nor a Hub "
                                 "repo org/name[@rev]")
        real = candidate.resolve()
        # Every file must resolve inside the adapter dir: a symlinked folder or weight file leading out
        # of it would let an API caller read arbitrary files on the server.
        for path in [real, *real.iterdir()] if real.is_dir() else [real]:
            if not path.resolve().is_relative_to(root):
                raise SourceNotAllowed(f"adapter source {source!r} leads outside the adapter directory "
                                       f"{self.adapter_dir}; only bundles inside it (or Hub repos) can be loaded")
        return real
