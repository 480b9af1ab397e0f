"""A persistent, content-keyed cache of what `hf-bwsk analyze` renders, as the HF libraries cache.

An analysis of a config is a pure function of the config, the traced sizes, the command's options
and the code that runs it (torch, transformers, hf_bwsk). Its first run pays for the imports
(torch and transformers' modeling code, several seconds) and the trace; a repeated run with the
same inputs reads the rendered output (the printed tables and the bytes of every file written) from
here, without importing torch or transformers. This module is standard library only (and
``huggingface_hub.constants`` for ``HF_HOME``), so looking an entry up costs milliseconds.

Where: ``$HF_BWSK_CACHE`` if set, else ``<HF_HOME>/hf_bwsk/analysis`` (``HF_HOME`` as
``huggingface_hub`` resolves it, ``~/.cache/huggingface`` by default). One JSON file per key,
``<sha256 of the key>.json``, holding the key itself, the output and a digest of the output. Writes
go to a temporary file in the same directory, then ``os.replace``: a reader sees a whole entry or
none. An entry that cannot be read, does not parse, holds another key or fails its digest is
ignored (and rewritten by the run that recomputes it). Nothing outside the cache directory is
written or deleted; the directory may be removed at any time.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import tempfile
from pathlib import Path

from .. import env

CACHE_ENV = "HF_BWSK_CACHE"
FORMAT = 1
PACKAGE_DIR = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """The cache directory: ``$HF_BWSK_CACHE``, else ``<HF_HOME>/hf_bwsk/analysis``."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    from huggingface_hub.constants import HF_HOME

    return Path(HF_HOME) / "hf_bwsk" / "analysis"


def versions(extra: tuple[str, ...] = ()) -> dict[str, str | None]:
    """The versions a report records (`hf_bwsk.env.versions`: Python, torch, transformers, hf_bwsk, ...)
    and those of ``extra`` distributions, read from installed metadata without importing them."""
    found = env.versions()
    for name in extra:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def source_digest() -> str:
    """sha256 of hf_bwsk's own Python sources: an editable install keeps its version number while
    its code changes, and a changed analysis must not be answered from the cache."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def entry_key(material: dict) -> str:
    """The hex key of ``material`` (JSON-ready, canonicalised with sorted keys)."""
    return hashlib.sha256(_canonical(material)).hexdigest()


def load(material: dict, directory: Path | None = None) -> dict | None:
    """The output stored for ``material``, or None when there is no usable entry."""
    path = (directory or cache_dir()) / f"{entry_key(material)}.json"
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        output = entry["output"]
        if entry.get("format") != FORMAT or entry.get("key") != json.loads(_canonical(material)):
            return None
        if entry.get("digest") != hashlib.sha256(_canonical(output)).hexdigest():
            return None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    return output if isinstance(output, dict) else None


def store(material: dict, output: dict, directory: Path | None = None) -> Path | None:
    """Save ``output`` (JSON-ready) under ``material``'s key, atomically; return the entry's path,
    or None when the cache directory cannot be written (the command still answers, uncached)."""
    directory = directory or cache_dir()
    entry = {"format": FORMAT, "key": material, "output": output,
             "digest": hashlib.sha256(_canonical(output)).hexdigest()}
    path = directory / f"{entry_key(material)}.json"
    temporary = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=directory)
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(entry, file)
        os.chmod(temporary, 0o666 & ~_umask())  # as an ordinary file (mkstemp makes it private)
        os.replace(temporary, path)
    except OSError:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)  # our own temporary file, inside the cache directory
        return None
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
