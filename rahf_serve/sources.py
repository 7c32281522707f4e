"""Where a bundle comes from: a local folder or a Hub repo `org/name[@revision]`.

Every place that accepts an adapter source (CLI, API, evaluation) goes through `resolve_source`,
so local and Hub bundles are validated the same way.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import BundleNotFound

HUB_SPEC = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def exists(path: Path) -> bool:
    """`Path.exists`, except that a name the filesystem cannot hold (a component too long) is just absent.

    `Path.exists` raises for that instead of returning False, and the API would answer 500.
    """
    try:
        return path.exists()
    except OSError:
        return False


def is_hub_spec(source: str) -> bool:
    return bool(HUB_SPEC.match(source)) and not exists(Path(source).expanduser())


def parse_spec(spec: str) -> tuple[str, str | None]:
    """`org/name[@revision]` -> (repo id, revision or None for the default branch): the one parser
    for Hub specs of bundles and base models."""
    repo_id, _, revision = spec.partition("@")
    return repo_id, revision or None


def split_adapter_arg(arg: str) -> tuple[str, str]:
    """`NAME=SOURCE` or `SOURCE` (named after its folder or Hub repo): every `--adapter` flag."""
    from .registry import NAME

    name, sep, source = arg.partition("=")
    if sep and NAME.match(name):
        return name, source
    spec = parse_spec(arg)[0] if is_hub_spec(arg) else arg
    return Path(spec.rstrip("/")).name, arg


def resolve_source(source: str) -> Path:
    """A local directory for `source`, downloading Hub bundles into the Hub cache first."""
    local = Path(source).expanduser()
    if exists(local):
        return local
    if is_hub_spec(source):
        from .hub import download_bundle

        return download_bundle(source)
    raise BundleNotFound(f"adapter source {source!r} is neither an existing folder nor a Hub repo org/name[@rev]")
