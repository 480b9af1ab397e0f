"""One home for every name that appears on disk or in a card: folders, files, labels, the marker, the lock.

An experiment's output directory::

    output_dir/
      .hf-bwsk-run.json          marker: this runner wrote the directory; its identity (recipe, preset,
                                 seed, every effective hyperparameter) and the manifest of files it wrote
      .hf-bwsk-run.lock          the lock (:func:`run_lock`): present while a run writes the directory or a
                                 push reads it, and after a killed one; the holder's pid inside
      results.json               the grid's results (docs/RESULTS_FORMAT.md)
      <experiment>-<mode>/       finetune|scratch x conventional|bwsk-analyzed|bwsk-reversible:
                                 model.safetensors, config.json, tokenizer files, training_results.json
      checkpoints/               everything else: per-variant Trainer checkpoints and optimizer
                                 states, the tiny preset's corpus and pretrained base

A trainer's ``output_dir`` holds ``training_results.json`` and, outside ``conventional`` mode, the
S/K and CALM reports. Every other module imports these names from here.
"""

import json
import math
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import BWSKError

EXPERIMENTS = ("finetune", "scratch")
MODES = ("conventional", "analyzed", "reversible")
MODE_FOLDERS = {"conventional": "conventional", "analyzed": "bwsk-analyzed", "reversible": "bwsk-reversible"}
EXPERIMENT_LABELS = {"finetune": "Fine-tune", "scratch": "From Scratch"}
MODE_LABELS = {"conventional": "Conventional", "analyzed": "BWSK Analyzed", "reversible": "BWSK Reversible"}

MARKER = ".hf-bwsk-run.json"
LOCK = ".hf-bwsk-run.lock"
RESULTS = "results.json"
TRAINING_RESULTS = "training_results.json"
SK_REPORT = "sk_report.json"
CALM_REPORT = "calm_report.json"
ANALYSIS_HTML = "analysis_report.html"
CHECKPOINTS = "checkpoints"
PARTIAL_SUFFIX = ".partial"
README = "README.md"
LOSS_PLOT = "plots/loss_curves.png"
MEMORY_PLOT = "plots/peak_memory.png"
MEMORY_KINDS = {
    "cuda_max_allocated": "whole-step peak, CUDA max allocated (weights, gradients, optimizer state, activations)",
    "cpu_whole_step_peak": "whole-step peak, live storages on CPU (weights, gradients, optimizer state, activations)",
    "cpu_bytes_kept_for_backward": "bytes kept for backward after one forward (CPU; not a peak)",
}
# What `activation_memory_mb` is, wherever it is shown beside the peak.
ACTIVATION_MEMORY_LABEL = "activations kept for backward after the forward"


def variant_name(experiment: str, mode: str) -> str:
    """The folder of one variant, e.g. ``finetune-bwsk-reversible``."""
    return f"{experiment}-{MODE_FOLDERS[mode]}"


VARIANTS = tuple(variant_name(experiment, mode) for experiment in EXPERIMENTS for mode in MODES)


def variant_label(experiment: str | None, mode: str) -> str:
    """Human name of a variant, e.g. ``Fine-tune (BWSK Reversible)``; the model-index result name."""
    if experiment is None:
        return MODE_LABELS[mode]
    return f"{EXPERIMENT_LABELS[experiment]} ({MODE_LABELS[mode]})"


NON_FINITE = "non_finite"  # the key under which strict JSON names the values it wrote as null


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write ``data`` as strict, indented JSON through a temporary file and a rename (readers never
    see half a file).

    JSON has no NaN or Infinity: each non-finite float is written as null and named, with its
    value, under ``"non_finite"`` (e.g. ``{"loss_curve[3].loss": "nan"}``), so nothing is lost or
    silently turned into a number.
    """
    path = Path(path)
    non_finite: dict[str, str] = {}
    clean = _finite_only(data, "", non_finite)
    if non_finite:
        clean[NON_FINITE] = {**clean.get(NON_FINITE, {}), **non_finite}
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _finite_only(value, where: str, non_finite: dict[str, str]):
    """``value`` with every non-finite float replaced by None, recorded in ``non_finite`` by its path."""
    if isinstance(value, float) and not math.isfinite(value):
        non_finite[where] = str(value)
        return None
    if isinstance(value, dict):
        return {key: _finite_only(item, f"{where}.{key}" if where else str(key), non_finite)
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_only(item, f"{where}[{index}]", non_finite) for index, item in enumerate(value)]
    return value


def read_json(path: str | os.PathLike, what: str) -> dict:
    """The JSON object in ``path``; a missing or broken file is a one-line error ending in ``what`` to do."""
    path = Path(path)
    if not path.is_file():
        raise BWSKError(f"{path} is missing: {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise BWSKError(f"{path} is not valid JSON ({error}); re-run the step that writes it") from error


def read_marker(run_dir: str | os.PathLike) -> dict:
    """The run directory's marker: ``{"identity": {...}, "written": [relative paths]}``."""
    marker = json.loads((Path(run_dir) / MARKER).read_text(encoding="utf-8"))
    if "identity" not in marker:  # a marker of hf-bwsk before the manifest: the identity alone
        marker = {"identity": marker, "written": []}
    return marker


def record_written(run_dir: str | os.PathLike, paths) -> None:
    """Add files this runner wrote under ``run_dir`` to the marker's manifest (main process only).

    The manifest is what ``--overwrite_output_dir`` may delete: files we did not record survive.
    """
    run_dir = Path(run_dir)
    marker = read_marker(run_dir)
    written = set(marker["written"])
    written.update(Path(path).resolve().relative_to(run_dir.resolve()).as_posix() for path in paths)
    written.discard(LOCK)  # never ours to delete: overwriting it mid-run would let a second holder in
    write_json(run_dir / MARKER, {**marker, "written": sorted(written)})


def files_under(directory: str | os.PathLike) -> list[Path]:
    """Every file below ``directory`` (none if it does not exist)."""
    directory = Path(directory)
    return sorted(path for path in directory.rglob("*") if path.is_file()) if directory.is_dir() else []


# A holder that is releasing as we ask lets us in within this; a live one refuses us after it.
LOCK_WAIT_S = 0.5


@contextmanager
def run_lock(run_dir: str | os.PathLike, *, create: bool = False) -> Iterator[None]:
    """Hold ``run_dir``'s exclusive lock (:data:`LOCK`, through ``filelock``) until the block ends.

    One run writes a directory, or one push reads it, at a time. The lock is the operating system's
    (``flock``): a killed holder's is released with its process, so the file it leaves behind, with its
    dead pid inside, blocks nothing. Reentrant in one thread (a run's own push); another thread or
    process is refused. With ``create``, a missing directory is made and, if the block leaves it
    empty, removed again; without, a missing directory is not locked (the caller refuses it).

    Raises:
        BWSKError: another process holds the lock (naming its pid), or the filesystem has no locks.
    """
    from filelock import FileLock, Timeout

    run_dir = Path(run_dir)
    if not run_dir.is_dir() and not create:
        yield
        return
    made = [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    # One instance per path (is_singleton) counts this thread's nested holds.
    lock = FileLock(path, timeout=LOCK_WAIT_S, is_singleton=True, on_acquired=_record_holder)
    try:
        try:
            lock.acquire()
        except Timeout:
            raise BWSKError(f"{run_dir} is in use by {_holder(path)} (a run writing it or a push reading it); "
                            "wait for that process to end, or stop it, then run this again") from None
        except OSError as error:
            raise BWSKError(f"cannot lock {run_dir} ({error}); pass a directory you can write to, on a "
                            "filesystem with file locks") from error
        try:
            yield
        finally:
            if lock.lock_counter == 1:
                # Unlinked while held: a process that opened it sees it unlinked once it gets the lock, and retries.
                with suppress(OSError):
                    path.unlink()
            lock.release()
    finally:
        for folder in made:  # deepest first; only folders this call made and the block left empty
            with suppress(OSError):
                folder.rmdir()


def _record_holder(fd: int) -> None:
    """filelock's ``on_acquired``: write who holds the lock into the lock file, for a refused process to name."""
    holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, holder)
    os.ftruncate(fd, len(holder))


def _holder(path: Path) -> str:
    """Who holds the lock, from the record in the lock file: ``pid 123 on host since ...``."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        pid, host, since = int(holder["pid"]), str(holder["host"]), str(holder["since"])
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its pid yet)"
    if host == socket.gethostname() and not _alive(pid):  # a killed holder's record, not yet overwritten
        return "another process (it has not written its pid yet)"
    return f"pid {pid} on {host} since {since}"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (signal 0 checks, sends nothing; Windows: assumed)."""
    if os.name != "posix":  # os.kill would terminate it there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another account's process
        return True
    return True
