"""Which file a model name's configuration comes from, answered with the standard library alone.

`hf_bwsk.models.load_config` and the analysis cache of `hf-bwsk analyze` resolve a name the same
way: an existing local path first, then a built-in name (its ``config.json`` shipped in
``hf_bwsk/models/configs/<name>.json``). Anything else is a Hub id or a mistake, which only
`load_config` (with transformers) can tell. Kept free of torch and transformers so that a cached
`hf-bwsk analyze` and ``hf-bwsk --help`` answer without importing them.
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "models" / "configs"
BUILTIN_NAMES = sorted(path.stem for path in CONFIG_DIR.glob("*.json"))
DIRECTORY, BUILTIN = "directory", "builtin"


def local_config_source(name_or_dir: str | os.PathLike) -> tuple[str, Path] | None:
    """``("directory", path)`` for an existing local path, ``("builtin", shipped config.json)`` for a
    built-in name, None for anything else (a Hub id, or a name `load_config` will refuse)."""
    source = str(name_or_dir)
    path = Path(source).expanduser()
    if path.exists():
        return DIRECTORY, path
    if source in BUILTIN_NAMES:
        return BUILTIN, CONFIG_DIR / f"{source}.json"
    return None
