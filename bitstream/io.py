"""Atomic writes and provenance shared by every stage.

A stage never leaves a half-written output behind: everything is written to a temporary file in the
destination directory and renamed into place (``os.replace`` is atomic on POSIX within one
filesystem). Provenance (code version and config hash) is attached to every metric row, because
published numbers fail to reproduce mostly when that context is lost (design card, "Results layout").
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

# ---------------------------------------------------------------------------------------------------
# One way to fail: a user error (bad input, a full disk, a read-only directory) ends a stage with ONE
# line naming the file / key / value and exit status 2; only bugs end in a traceback.

USER_EXIT_CODE = 2
_OS_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or directory",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "not a directory",
}


class UserError(ValueError):
    """Something the user can fix; its message names the culprit and what was expected."""


class StageExit(SystemExit):
    """``SystemExit`` with status 2 whose ``str`` is the one-line message (already printed)."""

    def __init__(self, message: str, code: int = USER_EXIT_CODE):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def os_error_message(err: OSError, path: str | os.PathLike | None = None, action: str = "") -> str:
    """``PATH: <action>: no space left on device`` -- the path first, then what went wrong."""
    where = path if path is not None else (err.filename or "?")
    reason = _OS_REASONS.get(err.errno) or err.strerror or str(err)
    if err.errno is None and path is not None:
        # numpy's short write ("83168 requested and 14336 written") carries no errno: say why
        free = _free_bytes(Path(path))
        if free is not None and free < (1 << 20):
            reason = f"no space left on device ({free} bytes free; {reason})"
    return f"{where}: {action + ': ' if action else ''}{reason}" + (f" [errno {errno.errorcode.get(err.errno, err.errno)}]"
                                                                   if err.errno else "")


def _as_os_error(err: BaseException) -> OSError | None:
    """The OS error behind ``err``: itself, the one torch's zip writer wrapped, or the errno in the
    text of a Rust ``tokenizers`` error ("No space left on device (os error 28)")."""
    if isinstance(err, UserError):
        return None
    if isinstance(err, OSError):
        return err
    cause = err.__cause__ or err.__context__
    if isinstance(cause, OSError):
        return cause
    m = re.search(r"\(os error (\d+)\)", str(err))
    if m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code))
    return None


def _free_bytes(path: Path) -> int | None:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and not isinstance(err, UserError) and err.errno is not None:
        text = os_error_message(err)
    elif isinstance(err, KeyError):
        text = f"missing key {err.args[0]!r}" if err.args else "missing key"
    else:
        text = str(err) if str(err) else type(err).__name__
    return " ".join(text.split())


def stage_main(stage: str) -> Callable:
    """Decorator for a stage's ``main(argv)``: user errors -> one line on stderr, exit status 2.

    Caught: ``ValueError`` (``UserError``, ``UnicodeDecodeError``, ...), ``OSError`` (missing files,
    no space, read-only, permission), ``KeyError``, and ``SystemExit`` raised with a message
    (``raise SystemExit("...")``). Anything else is a bug and keeps its traceback.
    """

    def deco(main: Callable) -> Callable:
        @functools.wraps(main)
        def wrapper(argv=None):
            try:
                return main(argv)
            except StageExit:
                raise
            except SystemExit as err:
                if not isinstance(err.code, str):
                    raise
                message = " ".join(err.code.split())
                if not message.startswith(f"{stage}"):
                    message = f"{stage}: {message}"
            except (ValueError, OSError, KeyError) as err:
                message = f"{stage}: {one_line(err)}"
            print(message, file=sys.stderr)
            raise StageExit(message)

        return wrapper

    return deco


# ---------------------------------------------------------------------------------------------------
# Atomic writes


def _remove_stale(parent: Path, name: str) -> None:
    """Remove temporary files / directories an earlier, killed write of ``name`` left behind.

    Only this project's own pattern (``.{name}.XXXXXXXX.tmp`` / ``.{name}.XXXXXXXX`` directories from
    :func:`atomic_path` / :func:`atomic_dir`) is touched. One job writes one path at a time (Snakemake
    holds the output), so a leftover of the same name is never a live write.
    """
    try:
        entries = list(parent.glob(f".{glob_escape(name)}.*"))
    except OSError:
        return
    for entry in entries:
        rest = entry.name[len(name) + 2:]
        if not (rest.endswith(".tmp") and len(rest) == 12) and not (entry.is_dir() and len(rest) == 8):
            continue
        try:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        except OSError:
            pass


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@contextlib.contextmanager
def _os_errors_name(path: Path) -> Iterator[None]:
    """Inside the block, an OS error (also one wrapped by torch, numpy or tokenizers) becomes a
    ``UserError`` naming ``path``; any other exception passes through unchanged."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 -- only OS errors are converted, the rest re-raised
        os_err = _as_os_error(err)
        if os_err is None:
            raise
        raise UserError(os_error_message(os_err, path, "cannot write")) from err


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Leftovers of an earlier killed write are removed first; the result is group/world readable
    (0644). An ``OSError`` while writing (no space, read-only, permission) becomes one naming ``path``.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; expected a file path for the output")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path.parent, path.name)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise UserError(os_error_message(err, path, "cannot write")) from err
    tmp_path = Path(tmp)
    try:
        with _os_errors_name(path):
            yield tmp_path
            if tmp_path.is_file():
                os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Like :func:`atomic_path` for a directory: fill a temporary sibling, then swap it in (mode 0755)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path.parent, path.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as err:
        raise UserError(os_error_message(err, path, "cannot write")) from err
    try:
        with _os_errors_name(path):
            yield tmp
            os.chmod(tmp, 0o755)  # mkdtemp creates 0700: unreadable to the group on a shared cluster
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_writable(path: str | os.PathLike) -> None:
    """Fail now, naming ``path``, if an output could not be written there later (a directory in the
    way, a read-only or full file system, no permission) -- before minutes of sampling or training."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; expected a file path for the output")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # probe the nearest existing ancestor: create nothing yet
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=existing)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise UserError(os_error_message(err, path, "cannot write")) from err


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
    """Atomic ``torch.save``. torch's zip writer reports a full disk as ``RuntimeError: unexpected pos
    ...`` without the path; writing through a Python file keeps the ``OSError`` it came from."""
    import torch

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as err:
                cause = err.__cause__ or err.__context__
                if isinstance(cause, OSError):
                    raise cause from err
                raise


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
