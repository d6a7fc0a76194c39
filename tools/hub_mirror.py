"""An internal mirror of the Hugging Face hub, for tests: checkpoint directories served over HTTP.

It answers the hub's routes that `huggingface_hub` uses to list and download a repo: the
model API (`/api/models/REPO/revision/REV`, with `?blobs=true` file sizes, git blob ids and
LFS SHA-256), the tree listing `hf download` reads, and `/REPO/resolve/REV/FILE`. Like the
hub, a file kept in LFS (`*.safetensors`, `*.bin`) is a redirect to a content address
(`/lfs/SHA256`) on a "CDN" host (this server, named `localhost`); errors carry `X-Error-Code`
(`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`). Each repo has one commit, `main`.

A test can make it serve damaged bytes for a file (`damaged`), and it records every download
(`downloads`) to show which files were fetched.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")


@dataclass
class _File:
    data: bytes
    blob_id: str
    sha256: str | None  # set for LFS files


@dataclass
class HubMirror:
    """A running mirror: `endpoint` is what HF_ENDPOINT is set to."""

    endpoint: str
    cdn: str
    """Where LFS downloads are redirected: the same server under another host name."""
    repos: dict[str, dict[str, _File]]
    commits: dict[str, str]
    damaged: set[tuple[str, str]] = field(default_factory=set)
    """(repo, file) pairs served with their last byte flipped."""
    downloads: list[tuple[str, str]] = field(default_factory=list)
    """(repo, file) of every file download answered, in order."""


def _git_blob(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def _read_repo(directory: Path) -> dict[str, _File]:
    files: dict[str, _File] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        data = path.read_bytes()
        if name.endswith(LFS_SUFFIXES):
            sha = hashlib.sha256(data).hexdigest()
            pointer = (
                f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n"
            )
            files[name] = _File(data, _git_blob(pointer.encode()), sha)
        else:
            files[name] = _File(data, _git_blob(data), None)
    return files


def _commit(files: dict[str, _File]) -> str:
    listing = "".join(f"{name}\0{file.blob_id}\n" for name, file in sorted(files.items()))
    return hashlib.sha1(listing.encode(), usedforsecurity=False).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    mirror: HubMirror

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: tests read `downloads`, not a log."""

    def _error(self, status: HTTPStatus, code: str) -> None:
        body = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send(self, body: bytes, headers: dict[str, str], content_type: str) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _repo_at(self, repo: str, revision: str) -> dict[str, _File] | None:
        if repo not in self.mirror.repos:
            self._error(HTTPStatus.NOT_FOUND, "RepoNotFound")
            return None
        if revision not in {"main", self.mirror.commits[repo]}:
            self._error(HTTPStatus.NOT_FOUND, "RevisionNotFound")
            return None
        return self.mirror.repos[repo]

    def do_HEAD(self) -> None:
        """As GET, without the body."""
        self.do_GET()

    def do_GET(self) -> None:
        """The model API, resolve URLs and LFS content addresses."""
        url = urlsplit(self.path)
        path = unquote(url.path)
        if path.startswith("/api/models/") and "/tree/" in path:
            self._tree(path.removeprefix("/api/models/"))
        elif path.startswith("/api/models/"):
            self._model_info(path.removeprefix("/api/models/"))
        elif path.startswith("/lfs/"):
            query = parse_qs(url.query)
            self._lfs(path.removeprefix("/lfs/"), query.get("repo", [""])[0],
                      query.get("file", [""])[0])  # fmt: skip
        elif "/resolve/" in path:
            repo, _, rest = path.lstrip("/").partition("/resolve/")
            revision, _, name = rest.partition("/")
            self._resolve(repo, revision, name)
        else:
            self._error(HTTPStatus.NOT_FOUND, "RepoNotFound")

    def _model_info(self, rest: str) -> None:
        repo, _, revision = rest.partition("/revision/")
        files = self._repo_at(repo, revision or "main")
        if files is None:
            return
        siblings = []
        for name, file in files.items():
            sibling: dict[str, object] = {"rfilename": name, "size": len(file.data),
                                          "blobId": file.blob_id}  # fmt: skip
            if file.sha256:
                sibling["lfs"] = {"size": len(file.data), "sha256": file.sha256,
                                  "pointerSize": 134}  # fmt: skip
            siblings.append(sibling)
        info = {"id": repo, "modelId": repo, "sha": self.mirror.commits[repo],
                "private": False, "siblings": siblings}  # fmt: skip
        self._send(json.dumps(info).encode(), {}, "application/json")

    def _tree(self, rest: str) -> None:
        """The recursive file listing `snapshot_download` (`hf download`) reads."""
        repo, _, revision = rest.partition("/tree/")
        files = self._repo_at(repo, revision.rstrip("/"))
        if files is None:
            return
        entries = []
        for name, file in files.items():
            entry: dict[str, object] = {"type": "file", "path": name, "size": len(file.data),
                                        "oid": file.blob_id}  # fmt: skip
            if file.sha256:
                entry["lfs"] = {"oid": file.sha256, "size": len(file.data), "pointerSize": 134}
            entries.append(entry)
        self._send(json.dumps(entries).encode(), {}, "application/json")

    def _body(self, repo: str, name: str) -> bytes:
        data = self.mirror.repos[repo][name].data
        if (repo, name) in self.mirror.damaged and data:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        if self.command == "GET":
            self.mirror.downloads.append((repo, name))
        return data

    def _resolve(self, repo: str, revision: str, name: str) -> None:
        files = self._repo_at(repo, revision)
        if files is None:
            return
        file = files.get(name)
        if file is None:
            self._error(HTTPStatus.NOT_FOUND, "EntryNotFound")
            return
        headers = {"X-Repo-Commit": self.mirror.commits[repo]}
        if file.sha256:
            self.send_response(HTTPStatus.FOUND)
            where = f"repo={quote(repo, safe='')}&file={quote(name, safe='')}"
            # to another host, as the hub's to its CDN: clients follow it for the bytes only
            self.send_header("Location", f"{self.mirror.cdn}/lfs/{file.sha256}?{where}")
            self.send_header("X-Linked-Etag", f'"{file.sha256}"')
            self.send_header("X-Linked-Size", str(len(file.data)))
            self.send_header("Content-Length", "0")
            for header, value in headers.items():
                self.send_header(header, value)
            self.end_headers()
            return
        self._send(self._body(repo, name), {**headers, "ETag": f'"{file.blob_id}"'},
                   "application/octet-stream")  # fmt: skip

    def _lfs(self, sha: str, repo: str, name: str) -> None:
        file = self.mirror.repos.get(repo, {}).get(name)
        if file is None or file.sha256 != sha:
            self._error(HTTPStatus.NOT_FOUND, "EntryNotFound")
            return
        self._send(self._body(repo, name), {"ETag": f'"{sha}"'}, "application/octet-stream")


@contextmanager
def hub_mirror(repos: dict[str, Path], host: str = "127.0.0.1") -> Iterator[HubMirror]:
    """Serve `repos` (repo id -> checkpoint directory) on a free port of `host` until exit."""
    files = {repo: _read_repo(directory) for repo, directory in repos.items()}
    handler: type[_Handler] = type("Handler", (_Handler,), {})
    server = ThreadingHTTPServer((host, 0), handler)
    mirror = HubMirror(
        endpoint=f"http://{host}:{server.server_address[1]}",
        cdn=f"http://localhost:{server.server_address[1]}",
        repos=files,
        commits={repo: _commit(repo_files) for repo, repo_files in files.items()},
    )
    handler.mirror = mirror
    thread = threading.Thread(target=server.serve_forever, name="hub-mirror", daemon=True)
    thread.start()
    try:
        yield mirror
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
