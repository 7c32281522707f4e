"""The adapter registry: which adapters and presets are served under which names, and where they came from.

It enforces the loading policy (valid names, one load per name at a time, local paths from the API
only inside the adapter directory) and reads bundles on the caller's thread; the engine only
attaches the already-validated bundle between two steps.

A preset is a named blend and/or steering setting over loaded adapters, served as a model of its own
so that clients which send nothing but `model` (lm-eval, chat front ends) can use it. Adapters and
presets share one namespace; an adapter that a preset uses cannot be unloaded before the preset.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .blend import BlendKey
from .bundle import CONFIG_FILE, Bundle, read_bundle
from .engine_api import ServingEngine
from .errors import (
    AdapterConflict,
    BundleNotFound,
    InvalidAdapterName,
    InvalidRequest,
    LimitExceeded,
    ModelNotFound,
    RahfError,
    SourceNotAllowed,
)
from .request import SteeringSpec
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


@dataclass(frozen=True)
class Preset:
    name: str
    blend: BlendKey | None
    steering: SteeringSpec | None
    spec: dict[str, Any]
    """The preset as it was registered (for listings)."""
    created_at: float

    @property
    def uses(self) -> set[str]:
        return {n for n, _ in self.blend or ()} | ({self.steering.adapter} if self.steering else set())

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.spec, "created_at": int(self.created_at)}


class AdapterRegistry:
    def __init__(self, engine: ServingEngine, adapter_dir: str | Path = "adapters") -> None:
        self.engine = engine
        self.adapter_dir = Path(adapter_dir)
        self._adapters: dict[str, AdapterInfo] = {}
        self._presets: dict[str, Preset] = {}
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
            if name in self._adapters or name in self._busy or name in self._presets:
                raise AdapterConflict(f"an adapter or preset named {name!r} is already served; DELETE it first")
            self._busy.add(name)
        try:
            path = self._resolve(source) if confined else resolve_source(source)
            started = time.perf_counter()
            try:
                bundle = read_bundle(path, max_rank=self.engine.max_lora_rank)
            except LimitExceeded as err:  # the bundle reader knows no flags: name the one that sets the rank
                raise LimitExceeded(f"{err} (LoRA ranks above this server's --max-lora-rank "
                                    f"{self.engine.max_lora_rank} do not fit its slots)") from None
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
            users = sorted(p.name for p in self._presets.values() if name in p.uses)
            if users:
                raise AdapterConflict(f"adapter {name!r} is used by preset(s) {users}; DELETE /v1/presets/<name> first")
            self._busy.add(name)
        try:
            self.engine.detach_adapter(name)
            del self._adapters[name]
        finally:
            with self._lock:
                self._busy.discard(name)

    def presets(self) -> list[Preset]:
        return sorted(self._presets.values(), key=lambda p: p.name)

    def preset(self, name: str) -> Preset | None:
        return self._presets.get(name)

    def add_preset(self, name: str, blend: BlendKey | None, steering: SteeringSpec | None,
                   spec: dict[str, Any]) -> Preset:
        """Serve `blend` and/or `steering` as model `name`; validated now, as a request using it would be."""
        validate_name(name)
        if not blend and steering is None:
            raise InvalidRequest("a preset needs `adapters` (a blend), `steering`, or both")
        preset = Preset(name, blend, steering, spec, time.time())
        with self._lock:
            if name in self._adapters or name in self._busy or name in self._presets or name == self.engine.base.name:
                raise AdapterConflict(f"a model named {name!r} is already served; DELETE it first or pick another name")
            busy = sorted(preset.uses & self._busy)
            if busy:
                raise AdapterConflict(f"adapter(s) {busy} are being loaded or unloaded; retry")
            self.engine.validate_selection(None, blend, steering)
            self._presets[name] = preset
        return preset

    def remove_preset(self, name: str) -> None:
        with self._lock:
            if name not in self._presets:
                raise ModelNotFound(f"preset {name!r} is not registered")
            del self._presets[name]

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
