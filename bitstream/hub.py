"""``hub:`` paths: files of a Hugging Face Hub repository, fetched through ``huggingface_hub``.

A config value ``hub:<owner>/<repo>/<path/in/repo>[@<revision>]`` (e.g.
``hub:gbatzolis/CoBit/checkpoints/cobit_s_lm1b_1M_ema.pt@main``) names one file of a model repository;
anything else is a local path. :func:`resolve_file` turns either into a local file, using
``hf_hub_download`` for hub paths: the standard HF cache (``HF_HOME`` / ``HF_HUB_CACHE``), revision
pinning (a branch, tag or commit hash after ``@``), ``HF_HUB_OFFLINE=1`` (cache only) and its progress
bar. :func:`resolve_dir` does the same for a list of files under a directory (the four entropy tables).

An offline machine without the file in its cache gets one error that names the file and says how to
place a local copy (or fill the cache) instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

HUB_PREFIX = "hub:"


@dataclass(frozen=True)
class HubPath:
    """``hub:<repo_id>/<filename>[@revision]`` split into its parts."""

    repo_id: str
    filename: str           # path inside the repository ('' for the repository root)
    revision: str | None

    def __str__(self) -> str:
        name = f"{HUB_PREFIX}{self.repo_id}/{self.filename}".rstrip("/")
        return name + (f"@{self.revision}" if self.revision else "")

    def child(self, name: str) -> "HubPath":
        return HubPath(self.repo_id, f"{self.filename.rstrip('/')}/{name}".lstrip("/"), self.revision)


def is_hub(value) -> bool:
    return isinstance(value, str) and value.startswith(HUB_PREFIX)


def parse(value: str) -> HubPath:
    """``hub:owner/repo/path/file[@rev]`` -> :class:`HubPath`; a malformed value names itself."""
    if not is_hub(value):
        raise ValueError(f"{value!r}: not a hub path (expected 'hub:<owner>/<repo>/<file>[@<revision>]')")
    body = value[len(HUB_PREFIX):]
    revision = None
    if "@" in body:
        body, _, revision = body.rpartition("@")
        if not revision:
            raise ValueError(f"{value!r}: empty revision after '@'")
    parts = [p for p in body.split("/") if p]
    if len(parts) < 2:
        raise ValueError(f"{value!r}: expected 'hub:<owner>/<repo>/<file>[@<revision>]' (owner and repo "
                         f"are both needed)")
    return HubPath("/".join(parts[:2]), "/".join(parts[2:]), revision)


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub sees it (read when it was imported) or as the environment says now."""
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download(path: HubPath, what: str = "file") -> tuple[Path, dict]:
    """``hf_hub_download`` of one file -> (local path in the HF cache, provenance record).

    The provenance holds the hub path, repository, file, requested revision and the commit the cache
    entry belongs to (the snapshot directory name), so a result names exactly which weights made it.
    """
    from huggingface_hub import hf_hub_download

    if not path.filename:
        raise ValueError(f"{path}: names a repository, not a file")
    try:
        local = hf_hub_download(repo_id=path.repo_id, filename=path.filename, revision=path.revision)
    except Exception as err:  # noqa: BLE001 -- offline, missing, gated, network: all become one message
        how = (f"place a local copy and give its path instead of {path} in the config, or fill the Hugging "
               f"Face cache on a machine with network access (`hf download {path.repo_id} "
               f"{path.filename}" + (f" --revision {path.revision}" if path.revision else "") +
               "` into a shared HF_HOME)")
        state = "HF_HUB_OFFLINE=1 and it is not in the local cache" if offline() else \
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise FileNotFoundError(f"cannot fetch the {what} {path} ({state}); {how}") from err
    local = Path(local)
    # .../models--owner--repo/snapshots/<commit>/<filename>: the commit the file was resolved to.
    parts = local.parts
    commit = None
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i + 1 < len(parts):
            commit = parts[i + 1]
    return local, {"source": str(path), "repo_id": path.repo_id, "filename": path.filename,
                   "revision": path.revision or "main", "commit": commit}


def resolve_file(value: str | os.PathLike, what: str = "file") -> tuple[Path, dict]:
    """A local path or ``hub:`` path -> (existing local file, provenance record)."""
    if is_hub(value):
        return download(parse(str(value)), what)
    local = Path(value)
    if not local.is_file():
        raise FileNotFoundError(f"{what} {local}: file not found")
    return local, {"source": str(local), "revision": None, "commit": None}


def resolve_dir(value: str | os.PathLike, names: Iterable[str], what: str = "files") -> tuple[Path, dict]:
    """A local directory or ``hub:`` directory holding every one of ``names`` -> (local dir, provenance).

    Hub files are fetched one by one (each lands in the same snapshot directory of the cache).
    """
    names = list(names)
    if is_hub(value):
        base = parse(str(value))
        locals_, record = [], None
        for name in names:
            local, record = download(base.child(name), what)
            locals_.append(local)
        parents = {p.parent for p in locals_}
        if len(parents) != 1:  # cannot happen for one revision; guard against a moving branch
            raise RuntimeError(f"{value}: files resolved to different snapshots {sorted(map(str, parents))}")
        return parents.pop(), {**record, "source": str(value), "filename": base.filename}
    local = Path(value)
    missing = [n for n in names if not (local / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{what} {local}: missing {', '.join(missing)} (expected {', '.join(names)})")
    return local, {"source": str(local), "revision": None, "commit": None}
