"""Exceptions that users see. Each says what went wrong and what to do, in one line.

The HTTP layer maps them to status codes (`status` below), so the engine and the
bundle code never need to know about HTTP.
"""

from __future__ import annotations


class RahfError(Exception):
    """Base class for every error rahf-serve raises on purpose."""

    status: int = 500
    code: str = "internal_error"


class BaseModelError(RahfError):
    """The base model cannot be resolved or loaded."""

    status = 400
    code = "base_model_error"


class BundleError(RahfError):
    """An adapter bundle is missing, malformed or does not fit the loaded base."""

    status = 400
    code = "invalid_adapter"


class BundleNotFound(BundleError):
    status = 404
    code = "adapter_not_found"


class UnsafeFileError(BundleError):
    """A pickle-based weight file (.bin/.pt/.pkl): never loaded, it can run code."""

    code = "unsafe_adapter_file"


class CorruptBundleError(BundleError):
    code = "corrupt_adapter"


class FingerprintMismatch(BundleError):
    """The bundle was trained on another base model."""

    code = "base_model_mismatch"


class NoMatchingModules(BundleError):
    """The adapter's target modules match nothing in the base: it would be a silent no-op."""

    code = "adapter_matches_nothing"


class LimitExceeded(BundleError):
    """Rank or file size above the configured limits."""

    code = "adapter_limit_exceeded"


class HubError(BundleError):
    """The Hub answered with an error that none of the cases below covers (e.g. it is down)."""

    status = 502
    code = "hub_error"


class HubRepoNotFound(HubError):
    """No such repo, or it is private/gated and no valid token was sent (the Hub does not say which)."""

    status = 404
    code = "hub_repo_not_found"


class HubRevisionNotFound(HubError):
    """The repo exists but has no such branch, tag or commit."""

    status = 404
    code = "hub_revision_not_found"


class HubAccessDenied(HubError):
    """The token lacks the right to read or write this repo."""

    status = 403
    code = "hub_access_denied"


class NotABundleRepo(HubError):
    """The repo exists but holds no adapter_config.json + adapter_model.safetensors."""

    status = 400
    code = "not_an_adapter_repo"


class HubOffline(HubError):
    """Offline (HF_HUB_OFFLINE=1 or no network) and the requested revision is not in the cache."""

    status = 503
    code = "hub_offline"


# ---------------------------------------------------------------- serving (registry, engine, API)


class InvalidRequest(RahfError):
    """A generation request the runtime cannot serve as asked (bad field values, unknown steering layer)."""

    status = 400
    code = "invalid_request"


class RequestTooLarge(InvalidRequest):
    """max_tokens, prompt length or context length above the server's limits."""

    code = "limit_exceeded"


class ModelNotFound(RahfError):
    """`model` (or an adapter named in a blend or steering) is neither the base nor a loaded adapter."""

    status = 404
    code = "model_not_found"


class InvalidAdapterName(BundleError):
    code = "invalid_adapter_name"


class AdapterConflict(RahfError):
    """An adapter with this name is already loaded (or being loaded)."""

    status = 409
    code = "adapter_exists"


class SourceNotAllowed(BundleError):
    """A local adapter path outside --adapter-dir (directly or through a symlink)."""

    status = 403
    code = "adapter_source_forbidden"


class QueueFull(RahfError):
    """Too many requests waiting; the client should retry later."""

    status = 503
    code = "queue_full"


class AdapterRemoved(RahfError):
    """The adapter a running request used was unloaded."""

    status = 410
    code = "adapter_removed"


class EngineStopped(RahfError):
    status = 503
    code = "engine_stopped"
