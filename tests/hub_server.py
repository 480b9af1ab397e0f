"""A small, strict Hugging Face Hub API server on 127.0.0.1 for publishing tests.

No package offers a local Hub that accepts uploads, so this implements the endpoints that
``huggingface_hub`` (2.4) really calls when pushing and that ``transformers`` calls when loading:

- ``GET /api/whoami-v2``; ``POST /api/repos/create``; ``POST /api/validate-yaml``;
  ``POST /api/models/{repo}/branch/{branch}``;
- ``POST /api/models/{repo}/preupload/{rev}``: "lfs" for binary samples, LFS-tracked extensions and
  files over 10 MB, so weights travel through the LFS batch API as on the real Hub;
- ``POST /{repo}.git/info/lfs/objects/batch`` ("basic" transfer), then ``PUT`` to a signed upload URL
  (no auth header, like S3; content checked against oid and size) and ``POST`` verify;
- ``POST /api/models/{repo}/commit/{rev}``: the NDJSON commit, applied atomically; it is refused as a
  whole when an ``lfsFile`` line points to an object never uploaded to this repo;
- ``HEAD/GET /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag``, ``Content-Length`` and
  ``X-Linked-Etag``/``X-Linked-Size`` for LFS files; ``GET /api/models/{repo}[/revision/{rev}]``;
  ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (transformers lists chat templates this way);
- ``GET /api/agent-harnesses``, which huggingface_hub fetches once per process (an empty registry).

Every API call needs ``Authorization: Bearer <token>`` with a known token; reads of public repos may be
anonymous, private repos answer 401 "RepoNotFound" to strangers. Requests the server does not know are
answered 404 and recorded in ``unhandled`` so tests can assert the client stayed on the known surface.
``fail(route, status, times)`` injects errors (e.g. a 500 on the commit) for fault tests.
Requires ``HF_HUB_DISABLE_XET=1`` on the client: the Xet CAS protocol is not served.
"""

import base64
import fnmatch
import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# The Hub's default .gitattributes (subset): files matching these are stored through LFS.
# The token and account the test suite's server knows (fixtures `hub` and `hf_home` in conftest.py).
TOKEN = "hf_test_write_token_0123456789"
USER = "tester"

LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.gz", "*.h5", "*.joblib", "*.model", "*.msgpack", "*.npy",
    "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar",
    "*.safetensors", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
)
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS).encode()
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
LFS_MEDIA_TYPE = "application/vnd.git-lfs+json"

REPO = r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)"
ROUTES = [
    ("GET", "whoami", r"/api/whoami-v2"),
    ("POST", "create_repo", r"/api/repos/create"),
    ("POST", "validate_yaml", r"/api/validate-yaml"),
    ("POST", "preupload", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)"),
    ("POST", "commit", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)"),
    ("POST", "create_branch", rf"/api/models/{REPO}/branch/(?P<rev>[^/]+)"),
    ("GET", "model_info", rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?"),
    ("GET", "tree", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?"),
    ("GET", "agent_harnesses", r"/api/agent-harnesses"),
    ("POST", "lfs_batch", rf"/{REPO}\.git/info/lfs/objects/batch"),
    ("PUT", "lfs_upload", r"/lfs-upload/(?P<oid>[0-9a-f]{64})"),
    ("POST", "lfs_verify", rf"/{REPO}\.git/info/lfs/objects/verify"),
    ("HEAD", "resolve", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
    ("GET", "resolve", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
]


class HubError(Exception):
    """An HTTP error answer: status, message and the ``X-Error-Code`` the client dispatches on."""

    def __init__(self, status, message, code=None, **payload):
        super().__init__(message)
        self.status, self.message, self.code, self.payload = status, message, code, payload


def git_blob_sha1(content):
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(oid, size):
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Blob:
    """A file in a commit: regular content, or an LFS object referenced by its sha256."""

    content: bytes | None = None
    lfs_oid: str | None = None
    size: int = 0

    @property
    def blob_id(self):
        return git_blob_sha1(lfs_pointer(self.lfs_oid, self.size) if self.lfs_oid else self.content)


@dataclass
class Commit:
    oid: str
    parent: str | None
    summary: str
    tree: dict
    created: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    refs: dict = field(default_factory=dict)
    commits: dict = field(default_factory=dict)
    lfs_oids: set = field(default_factory=set)  # objects uploaded to this repo

    def resolve(self, revision):
        oid = self.refs.get(revision, revision)
        if oid not in self.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]


class HubState:
    """Everything the server holds; one lock guards every change so commits are atomic."""

    def __init__(self, tokens):
        self.tokens = dict(tokens)
        self.repos = {}
        self.lfs = {}
        self.upload_signatures = {}
        self.faults = {}
        self.requests = []
        self.unhandled = []
        self.lock = threading.RLock()
        self._commit_counter = 0

    def new_commit(self, repo, parent, summary, tree):
        self._commit_counter += 1
        seed = json.dumps([repo.repo_id, parent, summary, sorted((p, b.blob_id) for p, b in tree.items()),
                           self._commit_counter])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, summary, tree,
                        "2026-01-01T00:00:00.000Z")
        repo.commits[commit.oid] = commit
        return commit


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hf-bwsk-test-hub"

    # -- plumbing -------------------------------------------------------------------------------
    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def endpoint(self):
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature; requests are recorded instead
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _dispatch(self, method):
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.body = self._read_body()
        for route_method, name, pattern in ROUTES:
            match = re.fullmatch(pattern, url.path)
            if route_method == method and match:
                with self.state.lock:
                    self.state.requests.append((method, name))
                try:
                    self._inject_fault(name)
                    params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    getattr(self, f"route_{name}")(**params)
                except HubError as error:
                    self._send_error(error)
                return
        with self.state.lock:
            self.state.unhandled.append((method, url.path))
        self._send_error(HubError(404, f"Not served by the test Hub: {method} {url.path}"))

    def _read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _inject_fault(self, name):
        with self.state.lock:
            fault = self.state.faults.get(name)
            if fault and fault[1] > 0:
                fault[1] -= 1
                raise HubError(fault[0], f"Injected failure on {name}")

    def _send(self, status, body=b"", content_type="application/json", headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload, status=200, content_type="application/json", headers=None):
        self._send(status, json.dumps(payload).encode(), content_type, headers)

    def _send_error(self, error, headers=None):
        headers = {**(headers or {}), "X-Error-Message": error.message}
        if error.code:
            headers["X-Error-Code"] = error.code
        self._send_json({"error": error.message, **error.payload}, error.status, headers=headers)

    def _json_body(self):
        try:
            return json.loads(self.body)
        except ValueError:
            raise HubError(400, "Request body is not valid JSON") from None

    # -- auth ------------------------------------------------------------------------------------
    def _user(self, required=True):
        header = self.headers.get("Authorization", "")
        if not header:
            if required:
                raise HubError(401, "Authorization header is required")
            return None
        token = header.removeprefix("Bearer ").strip()
        user = self.state.tokens.get(token)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _repo(self, repo_id, write=False):
        user = self._user(required=write)
        repo = self.state.repos.get(repo_id)
        visible = repo is not None and (not repo.private or (user and repo_id.split("/")[0] == user))
        if not visible:
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if write and repo_id.split("/")[0] != user:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # -- account and repos -----------------------------------------------------------------------
    def route_whoami(self):
        user = self._user()
        self._send_json({"type": "user", "id": f"id-{user}", "name": user, "fullname": user, "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

    def route_create_repo(self):
        user = self._user()
        payload = self._json_body()
        if payload.get("type", "model") != "model":
            raise HubError(400, "The test Hub serves model repos only")
        namespace = payload.get("organization") or user
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a repo under {namespace}")
        repo_id = f"{namespace}/{payload['name']}"
        with self.state.lock:
            if repo_id in self.state.repos:
                raise HubError(409, "You already created this model repo", url=f"{self.endpoint}/{repo_id}")
            repo = Repo(repo_id, private=payload.get("visibility", "public") == "private" or bool(payload.get("private")))
            initial = self.state.new_commit(repo, None, "initial commit",
                                            {".gitattributes": Blob(GITATTRIBUTES, size=len(GITATTRIBUTES))})
            repo.refs["main"] = initial.oid
            self.state.repos[repo_id] = repo
        self._send_json({"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": f"id-{repo_id}"})

    def route_create_branch(self, repo, rev):
        with self.state.lock:
            target = self._repo(repo, write=True)
            if rev in target.refs:
                raise HubError(409, f"Branch {rev} already exists")
            start = self._json_body().get("startingPoint") or "main"
            target.refs[rev] = target.resolve(start).oid
        self._send_json({})

    def route_validate_yaml(self):
        self._user()
        content = self._json_body().get("content", "")
        errors = []
        if content.startswith("---"):
            front, _, _ = content[3:].partition("\n---")
            try:
                metadata = yaml.safe_load(front) or {}
                errors = model_index_errors(metadata.get("model-index"))
            except yaml.YAMLError as error:
                errors = [f"YAML front matter does not parse: {error}"]
        if errors:
            self._send_json({"errors": [{"message": message} for message in errors], "warnings": []}, 400)
        else:
            self._send_json({"errors": [], "warnings": []})

    # -- upload ----------------------------------------------------------------------------------
    def route_preupload(self, repo, rev):
        with self.state.lock:
            target = self._repo(repo, write=True)
            tree = target.resolve(rev).tree
        answers = []
        for entry in self._json_body().get("files", []):
            path, size = entry["path"], entry["size"]
            sample = base64.b64decode(entry["sample"])
            lfs = is_lfs(path, size, sample)
            existing = tree.get(path)
            remote_oid = None
            if existing is not None:
                remote_oid = existing.lfs_oid if lfs else (None if existing.lfs_oid else git_blob_sha1(existing.content))
            answers.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": remote_oid})
        self._send_json({"files": answers})

    def route_lfs_batch(self, repo):
        if LFS_MEDIA_TYPE not in self.headers.get("Accept", ""):
            raise HubError(406, f"LFS batch requests must accept {LFS_MEDIA_TYPE}")
        payload = self._json_body()
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", []):
            raise HubError(422, "Only uploads over the 'basic' transfer are served")
        objects = []
        with self.state.lock:
            target = self._repo(repo, write=True)
            for obj in payload["objects"]:
                oid, size = obj["oid"], obj["size"]
                answer = {"oid": oid, "size": size, "authenticated": True}
                # An object already stored for this repo gets no upload action, as on the Hub.
                if oid not in target.lfs_oids or len(self.state.lfs[oid]) != size:
                    signature = secrets.token_hex(8)
                    self.state.upload_signatures[signature] = (target.repo_id, oid, size)
                    answer["actions"] = {
                        "upload": {"href": f"{self.endpoint}/lfs-upload/{oid}?sig={signature}"},
                        "verify": {"href": f"{self.endpoint}/{target.repo_id}.git/info/lfs/objects/verify"},
                    }
                objects.append(answer)
        self._send_json({"transfer": "basic", "objects": objects}, content_type=LFS_MEDIA_TYPE)

    def route_lfs_upload(self, oid):
        signature = self.query.get("sig", [""])[0]
        with self.state.lock:
            grant = self.state.upload_signatures.get(signature)
            if grant is None or grant[1] != oid:
                raise HubError(403, "Upload URL signature is invalid")
            repo_id, _, size = grant
            if len(self.body) != size or hashlib.sha256(self.body).hexdigest() != oid:
                raise HubError(400, f"Uploaded content does not match oid {oid} and size {size}")
            self.state.lfs[oid] = self.body
            self.state.repos[repo_id].lfs_oids.add(oid)
            del self.state.upload_signatures[signature]
        self._send(200)

    def route_lfs_verify(self, repo):
        payload = self._json_body()
        with self.state.lock:
            target = self._repo(repo, write=True)
            stored = self.state.lfs.get(payload["oid"])
            if payload["oid"] not in target.lfs_oids or stored is None or len(stored) != payload["size"]:
                raise HubError(404, f"LFS object {payload['oid']} was not uploaded")
        self._send_json({})

    def route_commit(self, repo, rev):
        if self.headers.get("Content-Type", "").split(";")[0] != "application/x-ndjson":
            raise HubError(415, "Commits are sent as application/x-ndjson")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header" or not lines[0]["value"].get("summary"):
            raise HubError(400, "A commit starts with a header line holding a summary")
        header = lines[0]["value"]
        with self.state.lock:
            target = self._repo(repo, write=True)
            head = target.resolve(rev)
            if rev not in target.refs:
                raise HubError(400, f"Commits go to a branch, not to {rev}")
            if header.get("parentCommit") not in (None, head.oid):
                raise HubError(412, "A commit has happened since the parent commit. Please pull and retry.")
            tree = dict(head.tree)
            for line in lines[1:]:
                apply_operation(tree, line, target, self.state.lfs)
            commit = self.state.new_commit(target, head.oid, header["summary"], tree)
            target.refs[rev] = commit.oid
        self._send_json({"success": True, "commitOid": commit.oid,
                         "commitUrl": f"{self.endpoint}/{repo}/commit/{commit.oid}"})

    # -- download ----------------------------------------------------------------------------------
    def route_model_info(self, repo, rev="main"):
        with self.state.lock:
            target = self._repo(repo)
            commit = target.resolve(rev)
        self._send_json({
            "_id": f"id-{repo}", "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": commit.oid,
            "private": target.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
            "tags": [], "lastModified": commit.created, "createdAt": commit.created,
            "siblings": [{"rfilename": path} for path in sorted(commit.tree)],
        })

    def route_tree(self, repo, rev, path=""):
        recursive = self.query.get("recursive", ["False"])[0].lower() == "true"
        with self.state.lock:
            tree = self._repo(repo).resolve(rev).tree
        prefix = f"{path.rstrip('/')}/" if path else ""
        entries = {}
        for file_path, blob in sorted(tree.items()):
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix):].split("/")
            for depth in range(1, len(rest) if recursive else min(len(rest) - 1, 1) + 1):
                folder = prefix + "/".join(rest[:depth])
                entries.setdefault(folder, {"type": "directory", "oid": git_blob_sha1(folder.encode()), "path": folder})
            if recursive or len(rest) == 1:
                entries[file_path] = {"type": "file", "oid": blob.blob_id, "size": blob.size, "path": file_path}
                if blob.lfs_oid:
                    pointer_size = len(lfs_pointer(blob.lfs_oid, blob.size))
                    entries[file_path]["lfs"] = {"oid": blob.lfs_oid, "size": blob.size, "pointerSize": pointer_size}
        if path and not entries:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        self._send_json(list(entries.values()))

    def route_agent_harnesses(self):
        self._send_json({"standardEnvVars": [], "harnesses": {}})

    def route_resolve(self, repo, rev, path):
        with self.state.lock:
            target = self._repo(repo)
            commit = target.resolve(rev)
            blob = commit.tree.get(path)
            headers = {"X-Repo-Commit": commit.oid}
            if blob is None:
                self._send_error(HubError(404, f"Entry not found: {path}", "EntryNotFound"), headers)
                return
            content = self.state.lfs[blob.lfs_oid] if blob.lfs_oid else blob.content
        headers["ETag"] = f'"{blob.blob_id}"'
        if blob.lfs_oid:
            headers.update({"X-Linked-Etag": f'"{blob.lfs_oid}"', "X-Linked-Size": str(blob.size)})
        self._send(200, content, "application/octet-stream", headers)


def is_lfs(path, size, sample):
    """The Hub's rule: LFS for tracked patterns, binary content and files over the size threshold."""
    name = path.rsplit("/", 1)[-1]
    if any(fnmatch.fnmatch(name, pattern) for pattern in LFS_PATTERNS) or size > LFS_SIZE_THRESHOLD:
        return True
    return b"\0" in sample  # git's binary heuristic


def valid_path(path):
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and all(part not in ("", ".", "..") for part in parts)


def apply_operation(tree, line, repo, lfs_store):
    """Apply one NDJSON commit line to ``tree``; any bad line refuses the whole commit."""
    key, value = line.get("key"), line.get("value", {})
    path = value.get("path", "")
    if key in ("file", "lfsFile") and not valid_path(path):
        raise HubError(400, f"Invalid path in commit: {path!r}")
    if key == "file":
        if value.get("encoding") != "base64":
            raise HubError(400, f"{path}: only base64 file content is accepted")
        content = base64.b64decode(value["content"])
        tree[path] = Blob(content=content, size=len(content))
    elif key == "lfsFile":
        oid, size = value.get("oid"), value.get("size")
        if value.get("algo") != "sha256" or oid not in repo.lfs_oids or oid not in lfs_store:
            raise HubError(422, f"Your push was rejected: {path} points to LFS object {oid} that was never uploaded")
        if size is not None and size != len(lfs_store[oid]):
            raise HubError(422, f"{path}: LFS object size {size} does not match the uploaded object")
        tree[path] = Blob(lfs_oid=oid, size=len(lfs_store[oid]))
    elif key == "deletedFile":
        if tree.pop(path, None) is None:
            raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
    elif key == "deletedFolder":
        prefix = path.rstrip("/") + "/"
        for existing in [p for p in tree if p.startswith(prefix)]:
            del tree[existing]
    else:
        raise HubError(400, f"Unknown commit operation {key!r}")


def model_index_errors(model_index):
    """Structural checks the Hub applies to ``model-index`` (the fields the card widgets read)."""
    if model_index is None:
        return []
    errors = []
    if not isinstance(model_index, list) or not model_index:
        return ["model-index must be a non-empty list"]
    for entry in model_index:
        if not entry.get("name"):
            errors.append("model-index entries need a name")
        for result in entry.get("results", []):
            if not result.get("task", {}).get("type"):
                errors.append("each result needs task.type")
            dataset = result.get("dataset", {})
            if not dataset.get("name") or not dataset.get("type"):
                errors.append("each result needs dataset.name and dataset.type")
            for metric in result.get("metrics", []):
                if not metric.get("type") or not isinstance(metric.get("value"), (int, float, str)):
                    errors.append("each metric needs a type and a value")
    return errors


class HubServer:
    """Run the test Hub in a background thread: ``with HubServer({"token": "user"}) as hub: hub.endpoint``."""

    def __init__(self, tokens):
        self.state = HubState(tokens)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
        self._httpd.daemon_threads = True
        self._httpd.state = self.state
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def endpoint(self):
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def fail(self, route, status=500, times=1):
        """Answer the next ``times`` requests to ``route`` (a ROUTES name) with ``status``."""
        with self.state.lock:
            self.state.faults[route] = [status, times]

    def files(self, repo_id, revision="main"):
        """``{path: bytes}`` of a repo at a revision, as committed."""
        with self.state.lock:
            commit = self.state.repos[repo_id].resolve(revision)
            return {path: (self.state.lfs[b.lfs_oid] if b.lfs_oid else b.content) for path, b in commit.tree.items()}

    def lfs_paths(self, repo_id, revision="main"):
        with self.state.lock:
            commit = self.state.repos[repo_id].resolve(revision)
            return sorted(path for path, blob in commit.tree.items() if blob.lfs_oid)

    def commit_count(self, repo_id):
        with self.state.lock:
            return len(self.state.repos[repo_id].commits)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


def point_hf_at(hub, monkeypatch, home):
    """Send huggingface_hub and transformers to ``hub`` with a fresh cache and no stored token.

    huggingface_hub reads HF_ENDPOINT, the cache path and HF_HUB_DISABLE_XET once, at import: the
    constants are patched (monkeypatch restores them), and transformers' shared HfApi is reset so
    it is rebuilt for this endpoint.
    """
    import transformers.utils.hub as transformers_hub
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / "agent_harnesses.json"))
    monkeypatch.setattr(transformers_hub, "_hf_api", None)
