"""A Hub-compatible HTTP server on loopback, for tests of the real `huggingface_hub` client.

It implements only what huggingface_hub calls for create_repo, create_branch, create_commit
(README YAML validation, preupload, the LFS batch API and its PUT, the NDJSON commit), repo info,
tree listing and `resolve/` (GET and HEAD), with the Hub's `X-Error-Code` errors. Model repos only;
no auth checks, but every request's method, path and Authorization header is logged so tests can
assert on what the client sent. Blobs live on disk under `root`, keyed by sha256; refs and commits
are kept in memory.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".gguf", ".zip")
REGULAR_MAX_BYTES = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()


class HubHTTPError(Exception):
    """An error answer: `code` goes into X-Error-Code, which is how huggingface_hub picks its exception."""

    def __init__(self, status: int, message: str, code: str | None = None, *, url: str | None = None,
                 commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.url, self.commit = status, code, url, commit


@dataclass
class Entry:
    sha256: str
    size: int
    lfs: bool
    git_oid: str
    """git blob sha1 of the content (regular files) or of the LFS pointer (LFS files), as the Hub reports it"""


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, Entry]] = field(default_factory=dict)
    """commit sha -> the full file tree at that commit"""


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubState:
    """Repos, their commits and the blob store; one lock, because the server is threaded."""

    def __init__(self, root: Path) -> None:
        self.blobs = root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, Repo] = {}
        self.fail: dict[str, int] = {}
        """repo id -> HTTP status that every request for it gets (a Hub that is down, or forbids access)"""
        self.log: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()

    def repo(self, repo_id: str) -> Repo:
        if repo_id in self.fail:
            raise HubHTTPError(self.fail[repo_id], f"the test Hub fails {repo_id} on purpose")
        if repo_id not in self.repos:
            raise HubHTTPError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return self.repos[repo_id]

    def resolve(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        (self.blobs / sha).write_bytes(data)
        return sha

    def has_blob(self, sha256: str) -> bool:
        return (self.blobs / sha256).is_file()

    def create(self, repo_id: str, private: bool) -> None:
        repo = Repo(repo_id, private)
        tree = {".gitattributes": self.entry(GITATTRIBUTES, lfs=False)}
        repo.branches["main"] = self.new_commit(repo, tree, "initial commit")
        self.repos[repo_id] = repo

    def entry(self, data: bytes, *, lfs: bool) -> Entry:
        sha = self.store(data)
        oid = git_blob_oid(lfs_pointer(sha, len(data)) if lfs else data)
        return Entry(sha, len(data), lfs, oid)

    def new_commit(self, repo: Repo, tree: dict[str, Entry], message: str) -> str:
        sha = hashlib.sha1(f"{repo.repo_id}\n{message}\n{time.time_ns()}\n{sorted(tree)}".encode()).hexdigest()
        repo.commits[sha] = tree
        return sha


def _is_lfs(path: str, size: int, sample: bytes) -> bool:
    return path.endswith(LFS_SUFFIXES) or size > REGULAR_MAX_BYTES or b"\0" in sample


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects
    server: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr access log
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # ------------------------------------------------------------ plumbing

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        # Split before unquoting: a revision like "feature/x" arrives as one %2F-quoted segment.
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        state = self.server.state
        state.log.append((method, url.path, self.headers.get("Authorization")))
        body = self._read_body()
        try:
            with state.lock:
                status, payload, headers = self._route(method, parts, query, body)
        except HubHTTPError as err:
            status, payload, headers = err.status, {"error": str(err)}, {"X-Error-Message": str(err)}
            if err.code:
                headers["X-Error-Code"] = err.code
            if err.commit:
                headers["X-Repo-Commit"] = err.commit
            if err.url:  # create_repo(exist_ok=True) reads the existing repo's url from the 409 body
                payload["url"] = err.url
        self._send(method, status, payload, headers)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers, then the blank line that ends the body
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, method: str, status: int, payload: Any, headers: dict[str, str]) -> None:
        if isinstance(payload, bytes):
            data = payload
        else:
            data = json.dumps(payload).encode()
            headers.setdefault("Content-Type", "application/json")
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    # ------------------------------------------------------------ routes

    def _route(self, method: str, parts: list[str], query: dict[str, str], body: bytes) -> tuple[int, Any, dict]:
        if parts[:1] == ["api"]:
            if method == "POST" and parts[1:] == ["repos", "create"]:
                return self._create_repo(json.loads(body))
            if method == "POST" and parts[1:] == ["validate-yaml"]:
                return self._validate_yaml(json.loads(body))
            if parts[1:2] == ["models"] and len(parts) >= 4:
                return self._repo_api(method, f"{parts[2]}/{parts[3]}", parts[4:], query, body)
        if method == "PUT" and parts[:1] == ["_lfs"] and len(parts) == 2:
            return self._lfs_put(parts[1], body)
        if method == "POST" and len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}", json.loads(body))
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        raise HubHTTPError(404, f"no route for {method} /{'/'.join(parts)} in the test Hub")

    def _repo_api(self, method: str, repo_id: str, rest: list[str], query: dict[str, str], body: bytes):
        state = self.server.state
        repo = state.repo(repo_id)
        verb, arg = (rest[0], rest[1] if len(rest) > 1 else "main") if rest else ("info", "main")
        if method == "GET" and verb in ("info", "revision"):
            return self._info(repo, arg)
        if method == "GET" and verb == "tree":
            return self._tree(repo, arg, "/".join(rest[2:]), query.get("recursive", "").lower() == "true")
        if method == "POST" and verb == "branch":
            return self._create_branch(repo, arg, json.loads(body or b"{}"))
        if method == "POST" and verb == "preupload":
            return self._preupload(repo, arg, json.loads(body))
        if method == "POST" and verb == "commit":
            return self._commit(repo, arg, body)
        raise HubHTTPError(404, f"no route for {method} {verb} in the test Hub")

    def _create_repo(self, payload: dict) -> tuple[int, Any, dict]:
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.server.url}/{repo_id}"
        if repo_id in self.server.state.repos:
            raise HubHTTPError(409, "You already created this model repo", url=url)
        self.server.state.create(repo_id, private=payload.get("visibility", "public") == "private"
                                 or bool(payload.get("private")))
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def _validate_yaml(self, payload: dict) -> tuple[int, Any, dict]:
        content = payload.get("content", "")
        if not content.startswith("---"):
            return 200, {"errors": [], "warnings": [{"message": "Empty or missing yaml metadata in repo card"}]}, {}
        front = content.split("---", 2)[1] if content.count("---") >= 2 else ""
        try:
            meta = yaml.safe_load(front)
        except yaml.YAMLError as err:
            return 400, {"errors": [{"message": f"Invalid YAML: {err}"}]}, {}
        if meta is not None and not isinstance(meta, dict):
            return 400, {"errors": [{"message": "YAML metadata must be a mapping"}]}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def _info(self, repo: Repo, revision: str) -> tuple[int, Any, dict]:
        sha = self.server.state.resolve(repo, revision)
        siblings = [{"rfilename": path} for path in sorted(repo.commits[sha])]
        return 200, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": sha, "private": repo.private,
                     "siblings": siblings, "tags": [], "downloads": 0, "likes": 0}, {}

    def _tree(self, repo: Repo, revision: str, prefix: str, recursive: bool) -> tuple[int, Any, dict]:
        tree = repo.commits[self.server.state.resolve(repo, revision)]
        base = f"{prefix}/" if prefix else ""
        out: dict[str, dict] = {}
        for path, entry in sorted(tree.items()):
            if not path.startswith(base):
                continue
            rest = path[len(base):].split("/")
            for depth in range(1, len(rest)):
                folder = base + "/".join(rest[:depth])
                out.setdefault(folder, {"type": "directory", "path": folder, "oid": git_blob_oid(folder.encode()),
                                        "size": 0})
                if not recursive:
                    break
            if len(rest) == 1 or recursive:
                item = {"type": "file", "path": path, "oid": entry.git_oid, "size": entry.size}
                if entry.lfs:
                    item["lfs"] = {"oid": entry.sha256, "size": entry.size,
                                   "pointerSize": len(lfs_pointer(entry.sha256, entry.size))}
                out[path] = item
        return 200, list(out.values()), {}

    def _create_branch(self, repo: Repo, branch: str, payload: dict) -> tuple[int, Any, dict]:
        if branch in repo.branches:
            raise HubHTTPError(409, f"Reference refs/heads/{branch} already exists")
        start = payload.get("startingPoint") or "main"
        repo.branches[branch] = self.server.state.resolve(repo, start)
        return 200, {}, {}

    def _preupload(self, repo: Repo, revision: str, payload: dict) -> tuple[int, Any, dict]:
        tree = repo.commits[self.server.state.resolve(repo, revision)]
        files = []
        for f in payload["files"]:
            lfs = _is_lfs(f["path"], f["size"], base64.b64decode(f["sample"]))
            remote = tree.get(f["path"])
            oid = None
            if remote is not None:  # the client compares this with its own oid to skip unchanged files
                oid = remote.sha256 if remote.lfs else remote.git_oid
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        return 200, {"files": files}, {}

    def _lfs_batch(self, repo_id: str, payload: dict) -> tuple[int, Any, dict]:
        state = self.server.state
        repo = state.repo(repo_id)
        if "ref" in payload:
            state.resolve(repo, payload["ref"]["name"])
        objects = []
        for obj in payload["objects"]:
            item: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not state.has_blob(obj["oid"]):  # no "actions" tells the client the object is already there
                item["actions"] = {"upload": {"href": f"{self.server.url}/_lfs/{obj['oid']}", "header": {}}}
            objects.append(item)
        return 200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}

    def _lfs_put(self, oid: str, body: bytes) -> tuple[int, Any, dict]:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubHTTPError(400, f"uploaded content does not match sha256 {oid}")
        self.server.state.store(body)
        return 200, b"", {}

    def _commit(self, repo: Repo, revision: str, body: bytes) -> tuple[int, Any, dict]:
        state = self.server.state
        parent = state.resolve(repo, revision)
        if revision not in repo.branches:
            raise HubHTTPError(400, f"can only commit to a branch, not {revision!r}")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        if header.get("parentCommit") not in (None, parent):
            raise HubHTTPError(412, "A commit has happened since. Please refresh and try again.")
        tree = dict(repo.commits[parent])
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                tree[value["path"]] = state.entry(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                if not state.has_blob(value["oid"]):
                    raise HubHTTPError(400, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                size = (state.blobs / value["oid"]).stat().st_size
                tree[value["path"]] = Entry(value["oid"], size, True, git_blob_oid(lfs_pointer(value["oid"], size)))
            elif key == "deletedFile":
                if tree.pop(value["path"], None) is None:
                    raise HubHTTPError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key != "header":
                raise HubHTTPError(400, f"the test Hub does not support commit operation {key!r}")
        sha = state.new_commit(repo, tree, header["summary"])
        repo.branches[revision] = sha
        return 200, {"success": True, "commitOid": sha, "commitUrl": f"{self.server.url}/{repo.repo_id}/commit/{sha}",
                     "pullRequestUrl": None}, {}

    def _resolve(self, repo_id: str, revision: str, path: str) -> tuple[int, Any, dict]:
        state = self.server.state
        repo = state.repo(repo_id)
        sha = state.resolve(repo, revision)
        entry = repo.commits[sha].get(path)
        if entry is None:
            raise HubHTTPError(404, f"{path} does not exist at {sha}", "EntryNotFound", commit=sha)
        etag = entry.sha256 if entry.lfs else entry.git_oid
        return 200, (state.blobs / entry.sha256).read_bytes(), {
            "ETag": f'"{etag}"', "X-Repo-Commit": sha, "Content-Type": "application/octet-stream"}


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = HubState(root)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join()

    def seed(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """Commit `files` directly (for repos push_bundle would refuse to make); returns the commit sha.

        A missing repo is created, a missing branch starts from main.
        """
        state = self.state
        with state.lock:
            if repo_id not in state.repos:
                state.create(repo_id, private=False)
            repo = state.repos[repo_id]
            tree = dict(repo.commits[repo.branches.get(branch, repo.branches["main"])])
            tree.update({path: state.entry(data, lfs=_is_lfs(path, len(data), data[:512])) for path, data in files.items()})
            repo.branches[branch] = state.new_commit(repo, tree, f"seed {branch}")
            return repo.branches[branch]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The repo's files at a revision, read from the store."""
        state = self.state
        with state.lock:
            repo = state.repo(repo_id)
            tree = repo.commits[state.resolve(repo, revision)]
            return {path: (state.blobs / e.sha256).read_bytes() for path, e in tree.items()}

    def requests(self, method: str, path_contains: str = "") -> list[tuple[str, str, str | None]]:
        """Logged requests with this method whose path contains `path_contains`."""
        return [r for r in self.state.log if r[0] == method and path_contains in r[1]]
