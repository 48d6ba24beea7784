"""Atomic writes and provenance shared by every stage.

A stage never leaves a half-written output behind: everything is written to a temporary file in the
destination directory and renamed into place (``os.replace`` is atomic on POSIX within one
filesystem). Provenance (code version and config hash) is attached to every metric row, because
published numbers fail to reproduce mostly when that context is lost (design card, "Results layout").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def write_parquet(path: str | os.PathLike, df) -> None:
    """Write a pandas DataFrame as parquet, atomically."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def torch_save(path: str | os.PathLike, obj: Any) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (bounded memory for large caches)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def config_hash(cfg: Any) -> str:
    """Short, order-independent hash of a (JSON-serialisable) config section."""
    blob = json.dumps(cfg, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


_CODE_VERSION: str | None = None


def code_version() -> str:
    """The git commit of the code that runs (``+dirty`` when the tree has changes); 'unknown' outside git."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        env = os.environ.get("BITSTREAM_CODE_VERSION")
        if env:
            _CODE_VERSION = env
        else:
            root = Path(__file__).resolve().parent.parent
            try:
                commit = subprocess.run(
                    ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                    capture_output=True, text=True, timeout=10, check=True,
                ).stdout.strip()
                dirty = subprocess.run(
                    ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                    capture_output=True, text=True, timeout=10,
                ).stdout.strip()
                _CODE_VERSION = commit + ("+dirty" if dirty else "")
            except (OSError, subprocess.SubprocessError):
                _CODE_VERSION = "unknown"
    return _CODE_VERSION


def provenance(cfg: Any) -> dict[str, str]:
    """Columns every metric row carries: code version and config hash."""
    return {"code_version": code_version(), "config_hash": config_hash(cfg)}


def parse_json_arg(text: str, what: str = "--params") -> dict:
    """Parse a JSON object given on the command line (rules pass config sections this way)."""
    if text.startswith("@"):
        return read_json(text[1:])
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"{what}: expected a JSON object, got {text[:80]!r} ({err})")
    if not isinstance(obj, dict):
        raise SystemExit(f"{what}: expected a JSON object, got {type(obj).__name__}")
    return obj
