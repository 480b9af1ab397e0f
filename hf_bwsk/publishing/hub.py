"""Publishing a run: the consolidated six-subfolder repo, assembled locally or pushed in one commit.

Repo layout (what the card's usage and ``from_pretrained(repo, subfolder=...)`` rely on)::

    README.md  results.json  plots/*.png
    <experiment>-<mode>/  model.safetensors, config.json, generation_config.json (if any),
                          tokenizer files, training_results.json

Only safetensors weights travel; checkpoints and optimizer states (``checkpoints/``) never do.
``push`` checks everything it can before the network (repo id, every variant, the token), then
creates the repo and uploads all files in ONE ``create_commit``, so a failure leaves the remote
as it was. ``push`` and ``assemble`` hold the run directory's lock while they read it
(:func:`hf_bwsk.layout.run_lock`): a directory a run is writing is refused, naming its pid. The token
is passed to huggingface_hub and never logged, written or put in a message.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import BWSKError
from ..layout import RESULTS, run_lock
from .cards import card_files
from .run import Run, load_run, unpublishable

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload BWSK run: 6 variants, card, results"


@dataclass(frozen=True)
class RepoFile:
    """One file of the repo: its path in the repo and its content (a local file or bytes)."""

    path_in_repo: str
    source: Path | bytes

    @property
    def size(self) -> int:
        return len(self.source) if isinstance(self.source, bytes) else self.source.stat().st_size


@dataclass
class PushResult:
    """What ``push`` sent (or, for a dry run, would send)."""

    repo_id: str
    revision: str
    files: list[tuple[str, int]]
    dry_run: bool
    commit_url: str | None = None
    commit_oid: str | None = None
    private: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def to_table(self) -> str:
        """The file list with sizes, one per line, and a total line."""
        width = max(len(path) for path, _ in self.files)
        lines = [f"{path:<{width}}  {size:>12,d} B" for path, size in self.files]
        verb = "would push" if self.dry_run else "pushed"
        lines.append(f"{len(self.files)} files, {self.total_bytes:,d} B: {verb} to {self.repo_id}@{self.revision}")
        return "\n".join(lines)


def check_publishable(run: Run, allow_diverged: bool) -> None:
    """Refuse a run with a diverged variant or non-finite weights unless the user says to publish it anyway."""
    problems = None if allow_diverged else unpublishable(run)
    if problems:
        raise BWSKError(f"{run.run_dir} is not fit to publish: {problems}; retrain those variants, "
                        "or pass --allow-diverged (allow_diverged=True) to publish it as it is")


def repo_files(run_dir: "str | Path | Run", *, repo_id: str | None = None, license: str = "mit") -> list[RepoFile]:
    """Every file of the consolidated repo, checked and sorted by path; README and plots rendered in memory."""
    run = load_run(run_dir)
    files = [RepoFile(path, content) for path, content in card_files(run, repo_id=repo_id, license=license).items()]
    files.append(RepoFile(RESULTS, run.run_dir / RESULTS))
    for variant, paths in run.files.items():
        files.extend(RepoFile(f"{variant}/{path.name}", path) for path in paths)
    return sorted(files, key=lambda f: f.path_in_repo)


def assemble(run_dir: str | Path, dest: str | Path, *, repo_id: str | None = None, license: str = "mit") -> list[Path]:
    """Write the consolidated repo folder for ``run_dir`` into ``dest`` (new or empty); return the files."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise BWSKError(f"{dest} is not empty; pass a new or empty folder to assemble into")
    written = []
    with run_lock(run_dir):
        for repo_file in repo_files(run_dir, repo_id=repo_id, license=license):
            target = dest / repo_file.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            content = repo_file.source if isinstance(repo_file.source, bytes) else repo_file.source.read_bytes()
            target.write_bytes(content)
            written.append(target)
    logger.info("Assembled %d files into %s", len(written), dest)
    return written


def check_repo_id(repo_id: str) -> None:
    """Refuse a malformed repo id before any network call."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        first_line = str(error).splitlines()[0]
        raise BWSKError(f"invalid repo id {repo_id!r}: {first_line} Use 'namespace/name'.") from None


def _resolve_token(token: str | None) -> str:
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise BWSKError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or pass token= to push)")
    return token


def check_token(token: str | None = None, *, endpoint: str | None = None) -> str:
    """The account a token (default: HF_TOKEN or the saved login) belongs to; refuses a missing or
    rejected token in one line. Runners call it before training, so a push cannot fail on it hours later."""
    from huggingface_hub import HfApi

    token = _resolve_token(token)
    return _who(HfApi(endpoint=endpoint, token=token), token)


def _who(api, token: str) -> str:
    """The account the token belongs to; a rejected token stops here, before any upload."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return api.whoami(token=token)["name"]
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "no answer"
        if status == 401:
            raise BWSKError(f"the Hugging Face token was rejected by {api.endpoint} (401); "
                            "pass a valid token with write access") from None
        raise BWSKError(f"could not check the token at {api.endpoint} (HTTP {status}); retry later") from None
    except Exception as error:  # the HTTP client's transport errors: refused, DNS, timeout
        raise BWSKError(f"could not reach {api.endpoint} ({type(error).__name__}: {error}); "
                        "check HF_ENDPOINT and the network") from error


def _remote_step(step: str, call, repo_id: str):
    """Run one Hub call; an HTTP failure becomes a one-line error naming the step (token-free)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return call()
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "no answer"
        server_says = (error.server_message or str(error)).strip().splitlines()[0]
        if status in (401, 403):  # retrying cannot help: the token may not write there
            raise BWSKError(f"push to {repo_id} refused during {step} (HTTP {status}: {server_says}): the token "
                            "lacks write access to that repo; use a token with write access to it, or push to "
                            "your own namespace") from None
        raise BWSKError(f"push to {repo_id} failed during {step} (HTTP {status}: {server_says}); "
                        "nothing was committed, run the push again") from None
    except Exception as error:  # failed LFS uploads (wrapped in RuntimeError), transport errors
        raise BWSKError(f"push to {repo_id} failed during {step} ({type(error).__name__}: {error}); "
                        "nothing was committed, run the push again") from error


def _refuse_token_in_files(files: list[RepoFile], token: str) -> None:
    """Stop before uploading a results or config file that holds the token (e.g. dumped arguments).

    Hub tokens are 37 characters; a string under 8 would match ordinary words ("tok" in "tokenizer").
    """
    if len(token) < 8:
        return
    needle = token.encode()
    for repo_file in files:
        if repo_file.path_in_repo.endswith(".safetensors"):
            continue
        content = repo_file.source if isinstance(repo_file.source, bytes) else repo_file.source.read_bytes()
        if needle in content:
            raise BWSKError(f"{repo_file.path_in_repo} contains your Hugging Face token; remove it before publishing")


def push(run_dir: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str = DEFAULT_COMMIT_MESSAGE, token: str | None = None, dry_run: bool = False,
         endpoint: str | None = None, license: str = "mit", allow_diverged: bool = False) -> PushResult:
    """Publish a run directory as one Hub repo with six variant subfolders, in a single atomic commit.

    ``repo_id`` is ``namespace/name`` (a bare name goes to the token's account). ``private`` applies
    when the repo is created; an existing repo keeps its visibility. ``revision`` is a branch, created
    from main if needed. ``dry_run`` checks and lists every file and its size without any network call.
    ``endpoint`` defaults to ``HF_ENDPOINT`` / huggingface.co. A run with a diverged variant or
    non-finite weights is refused unless ``allow_diverged``. The run directory's lock is held from
    before it is read to after the commit: a directory a run is writing is refused, naming its pid.
    """
    check_repo_id(repo_id)
    revision = revision or "main"
    with run_lock(run_dir):
        run = load_run(run_dir)  # a bad run directory is refused before the network is touched
        check_publishable(run, allow_diverged)
        if dry_run:
            files = repo_files(run, repo_id=repo_id, license=license)
            return PushResult(repo_id, revision, [(f.path_in_repo, f.size) for f in files], dry_run=True,
                              private=private)

        from huggingface_hub import CommitOperationAdd, HfApi

        token = _resolve_token(token)
        api = HfApi(endpoint=endpoint, token=token)
        account = _who(api, token)
        if "/" not in repo_id:
            repo_id = f"{account}/{repo_id}"
        files = repo_files(run, repo_id=repo_id, license=license)
        _refuse_token_in_files(files, token)
        _remote_step("repo creation", lambda: api.create_repo(repo_id, private=private, exist_ok=True), repo_id)
        if revision != "main":
            _remote_step(f"branch creation ({revision})",
                         lambda: api.create_branch(repo_id, branch=revision, exist_ok=True), repo_id)
        operations = [CommitOperationAdd(f.path_in_repo, f.source if isinstance(f.source, bytes) else str(f.source))
                      for f in files]
        logger.info("Pushing %d files to %s@%s in one commit", len(operations), repo_id, revision)
        commit = _remote_step(
            "the upload and commit",
            lambda: api.create_commit(repo_id, operations=operations, commit_message=commit_message, revision=revision),
            repo_id,
        )
        return PushResult(repo_id, revision, [(f.path_in_repo, f.size) for f in files], dry_run=False,
                          commit_url=commit.commit_url, commit_oid=commit.oid, private=private)
