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
