"""Weights by name: a Hugging Face Hub model id (``openai/imagegpt-small``) as a local folder.

``resolve(spec)`` is what every ``--checkpoint`` and ``igpt.load`` pass through first:

- a path that exists is returned as it is: a local folder always wins over a Hub id of the same spelling;
- otherwise a string shaped like a Hub id (``owner/name``) is looked up in the local Hugging Face cache
  first (``snapshot_download(local_files_only=True)``); when it is not there and the Hub may be reached
  (``HF_HUB_OFFLINE`` unset), the files igpt reads are downloaded into that cache;
- when neither works, one line says how to download the weights (``hf download owner/name``).

The cache folder and the offline switch are read from the environment at each call (``HF_HUB_CACHE``,
``HF_HOME``, ``XDG_CACHE_HOME``, ``HF_HUB_OFFLINE``), not when igpt is imported, so a process may change them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import huggingface_hub
from huggingface_hub import snapshot_download

from igpt.weights.hf import HF_INDEXES, HF_WEIGHTS

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_TRUE = {"1", "on", "yes", "true"}
# What igpt reads from a repository: configs, palette, weights, classifier head and the model card. The .bin
# weights only when a repository has no safetensors (many old ones hold both; one copy is enough).
_PATTERNS = ["*.json", "*.safetensors", "*.npz", "README.md"]
_BIN_PATTERNS = ["pytorch_model*.bin"]
_IGPT_WEIGHTS = ("model.safetensors", "sharded")


def is_hub_id(spec: str | Path) -> bool:
    """Whether ``spec`` is spelled like a Hub model id (``owner/name``), not whether the Hub holds it."""
    return isinstance(spec, str) and ".." not in spec and bool(_HUB_ID.match(spec))


def cache_dir() -> Path:
    """The Hugging Face Hub cache the environment names now (the same order of variables as huggingface_hub)."""
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(env[key]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def download_command(repo_id: str) -> str:
    """The command the installed huggingface_hub offers to fetch a repository (``hf`` since 0.34)."""
    major, minor = (int(x) for x in re.findall(r"\d+", huggingface_hub.__version__)[:2])
    cli = "hf" if (major, minor) >= (0, 34) else "huggingface-cli"
    return f"{cli} download {repo_id}"


def _has_weights(folder: Path) -> bool:
    return any((folder / name).exists() for name in (*HF_WEIGHTS, *HF_INDEXES, *_IGPT_WEIGHTS))


def resolve(spec: str | Path, *, revision: str | None = None, cache: str | Path | None = None,
            local_files_only: bool = False, force_download: bool = False,
            token: str | bool | None = None) -> Path:
    """The local folder ``spec`` names: itself when it exists, else the cached (or downloaded) snapshot of
    the Hub model it spells. Anything else comes back unchanged, for the readers' own errors."""
    path = Path(spec)
    if path.exists() or not is_hub_id(spec):  # a Path object always means a local path
        return path
    repo_id, folder = str(spec), Path(cache) if cache is not None else cache_dir()
    common = dict(revision=revision, cache_dir=folder, token=token, library_name="igpt")
    if not force_download:
        try:
            found = Path(snapshot_download(repo_id, local_files_only=True, **common))
            if _has_weights(found):
                return found
        except FileNotFoundError:  # huggingface_hub's LocalEntryNotFoundError: not cached
            pass
    why = "HF_HUB_OFFLINE is set" if offline() else "downloads are off (local_files_only)"
    if not (offline() or local_files_only):
        try:
            found = Path(snapshot_download(repo_id, allow_patterns=_PATTERNS, force_download=force_download,
                                           **common))
            if not _has_weights(found):
                found = Path(snapshot_download(repo_id, allow_patterns=_BIN_PATTERNS, **common))
            if _has_weights(found):
                return found
            why = "the repository holds no weights igpt reads"
        except Exception as e:  # network, authentication, a missing repository: all end in the same advice
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise FileNotFoundError(f"{repo_id} is not a local path, and the Hugging Face Hub model {repo_id} is not in "
                            f"the cache {folder} ({why}); download it with `{download_command(repo_id)}`")
