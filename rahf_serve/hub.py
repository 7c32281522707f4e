"""Hub round trip for adapter bundles: push a bundle folder as one commit, pull `org/name[@revision]`.

Everything goes through `huggingface_hub`, so `HF_ENDPOINT`, `HF_TOKEN` / the login cache,
`HF_HUB_CACHE` and `HF_HUB_OFFLINE` behave as they do for transformers. A pull fetches only the
bundle's own files (never pickle weights) and validates them with `read_bundle` before anyone
loads them. Hub failures become `HubError` subclasses that carry an HTTP status for the API.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import constants
from huggingface_hub.errors import (
    BadRequestError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .bundle import CARD_FILE, CONFIG_FILE, MANIFEST_FILE, VECTORS_FILE, WEIGHTS_FILE, read_bundle
from .errors import (
    BundleError,
    CorruptBundleError,
    HubAccessDenied,
    HubError,
    HubOffline,
    HubRepoNotFound,
    HubRevisionNotFound,
    NotABundleRepo,
)
from .sources import parse_spec

BUNDLE_FILES = (CONFIG_FILE, WEIGHTS_FILE, VECTORS_FILE, MANIFEST_FILE, CARD_FILE)
_LOGIN_HINT = "set HF_TOKEN or run `hf auth login`"


def download_bundle(spec: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Download the bundle files of Hub repo `org/name[@revision]` into the Hub cache; return the folder.

    A revision already in the cache loads without network; offline and uncached is `HubOffline`.
    """
    from huggingface_hub import snapshot_download

    repo_id, revision = parse_spec(spec)
    try:
        # Exact names, not globs: nothing else in the repo (pickles, other folders) is ever fetched.
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                        allow_patterns=list(BUNDLE_FILES)))
    except LocalEntryNotFoundError as err:
        if isinstance(err.__cause__, HfHubHTTPError):  # the Hub answered (e.g. 500, 403): not an offline case
            raise _translate(err.__cause__, repo_id, revision) from err
        why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else f"cannot connect to {constants.ENDPOINT}"
        cache = cache_dir or constants.HF_HUB_CACHE
        raise HubOffline(f"Hub adapter {spec} is not in the cache ({cache}) and the Hub is unreachable ({why}); "
                         "download it once with network access, or pass a local bundle folder") from err
    except (HfHubHTTPError, HFValidationError) as err:
        raise _translate(err, repo_id, revision) from err
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise NotABundleRepo(f"Hub repo {spec} is not a RAHF/PEFT adapter bundle: it has no {' or '.join(missing)} "
                             "(rahf-serve loads only safetensors LoRA adapters)")
    read_bundle(folder)
    return folder


def push_bundle(
    bundle_dir: str | os.PathLike[str],
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Validate a bundle, then upload its files to `repo_id` in one commit; return the commit URL.

    Creates the repo (and the branch `revision`, from the default branch) when missing. Bundle files
    that the repo has but this bundle lacks are deleted in the same commit, so a plain-PEFT push never
    leaves an older push's steering vectors beside new weights. `token=None` lets huggingface_hub
    find one (HF_TOKEN, then the login cache).
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    bundle = read_bundle(bundle_dir)
    # The format is flat: top-level files only; hidden ones are editor or OS droppings, not bundle files.
    local = sorted(p.name for p in bundle.path.iterdir() if p.is_file() and not p.name.startswith("."))
    name = (bundle.manifest or {}).get("name") or bundle.path.name
    kind = "RAHF adapter bundle" if bundle.manifest else "LoRA adapter"
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        remote = api.list_repo_files(repo_id, revision=revision)
        stale = [f for f in remote if f in BUNDLE_FILES and f not in local]
        operations = [CommitOperationAdd(f, str(bundle.path / f)) for f in local]
        operations += [CommitOperationDelete(f) for f in stale]
        info = api.create_commit(repo_id, operations=operations, revision=revision,
                                 commit_message=commit_message or f"Upload {kind} {name}")
    except OfflineModeIsEnabled as err:
        raise HubOffline(f"cannot push {bundle.path} to {repo_id}: HF_HUB_OFFLINE=1") from err
    except (HfHubHTTPError, HFValidationError) as err:
        raise _translate(err, repo_id, revision, writing=True) from err
    except ValueError as err:
        if isinstance(err.__cause__, BadRequestError):  # the Hub rejected the model card's YAML front matter
            raise CorruptBundleError(f"{bundle.path / CARD_FILE}: {err}") from err
        raise
    return info.commit_url


def _translate(err: Exception, repo_id: str, revision: str | None, writing: bool = False) -> BundleError:
    """One huggingface_hub error -> the rahf-serve error a user (or the HTTP API) sees."""
    if isinstance(err, HFValidationError):
        return BundleError(f"{repo_id!r} is not a valid Hub repo id (org/name[@revision]): {err}")
    if isinstance(err, GatedRepoError):
        return HubAccessDenied(f"Hub repo {repo_id} is gated: accept its terms on the Hub, then {_LOGIN_HINT}")
    if isinstance(err, RepositoryNotFoundError):
        return HubRepoNotFound(f"Hub repo {repo_id} not found (if it is private, {_LOGIN_HINT})")
    if isinstance(err, RevisionNotFoundError):
        return HubRevisionNotFound(f"Hub repo {repo_id} has no revision {revision!r} (a branch, tag or commit sha)")
    status = err.response.status_code if isinstance(err, HfHubHTTPError) else None
    if status in (401, 403):
        action = "write to" if writing else "read"
        return HubAccessDenied(f"not allowed to {action} Hub repo {repo_id} (HTTP {status}): {_LOGIN_HINT} "
                               "with a token that has access")
    first_line = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return HubError(f"Hub request for {repo_id} failed: {first_line}")
