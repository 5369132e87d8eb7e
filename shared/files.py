"""Files and folders: checked before any work starts, written without ever leaving half a file behind."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from shared.errors import ZooError


# --------------------------------------------------------------------------- checks before the work


def _nearest_existing(path: Path, what: str, given: Path) -> Path:
    """The nearest of ``path`` and its parents that is there; a symbolic link on the way that
    leads nowhere (a dangling link, a loop) is refused, since nothing could be made through it."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
        if os.path.lexists(candidate):
            _broken_link(candidate, what, given)
    return Path(path.anchor)


def _broken_link(link: Path, what: str, given: Path) -> None:
    try:
        target = os.readlink(link)
    except OSError:
        target = "?"
    raise ZooError(f"{what} {given}: {link} is a symbolic link to {target}, which does not lead to a file or "
                   "folder (dangling, or a loop); remove it or choose another path")


def _probe(folder: Path, what: str, path: Path) -> None:
    """Create and remove a file in ``folder``. ``os.access`` alone is not enough: it says yes
    to root everywhere, and yes to anyone on some file systems that refuse every write."""
    try:
        fd, name = tempfile.mkstemp(prefix=".zoo-write-check-", dir=folder)
    except OSError as error:
        raise ZooError(f"{what} {path}: cannot write in {folder} ({error.strerror or error}); "
                       "choose a folder you can write to") from None
    os.close(fd)
    os.unlink(name)


def _check_parents(path: Path, what: str) -> None:
    """The folders above ``path`` exist as folders we can write in, or can be made in one."""
    ancestor = _nearest_existing(path.absolute().parent, what, path)
    if not ancestor.is_dir():
        raise ZooError(f"{what} {path}: {ancestor} is a file, not a folder; choose another path")
    _probe(ancestor, what, path)


def output_dir(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a folder this process can create or write into, else a :class:`ZooError` naming ``what``
    (the option, e.g. ``--out``). Nothing is created."""
    path = _non_empty(path, what)
    if path.exists():
        if not path.is_dir():
            raise ZooError(f"{what} {path} is a file, not a folder; give a folder (a new name is fine)")
        _probe(path, what, path)
    else:
        if os.path.lexists(path):
            _broken_link(path, what, path)
        _check_parents(path, what)
    return path


def output_file(path: str | os.PathLike, what: str, suffix: str | None = None) -> Path:
    """``path`` as a file this process can (re)place, else a :class:`ZooError`. With ``suffix``
    (``".json"``), a name without one gets it and a name with another is refused."""
    if str(path).endswith(os.sep):
        raise ZooError(f"{what} {path} names a folder; give a file name" + (f" ending in {suffix}" if suffix else ""))
    path = _non_empty(path, what)
    if path.is_dir():
        raise ZooError(f"{what} {path} is a folder; give a file name"
                       + (f" ending in {suffix}" if suffix else ""))
    if suffix is not None:
        if not path.suffix:
            path = path.with_name(path.name + suffix)
        elif path.suffix.lower() != suffix:
            raise ZooError(f"{what} {path}: the file is written as {suffix[1:].upper()}; "
                           f"give a name ending in {suffix} (or none, and {suffix} is added)")
        if path.is_dir():
            raise ZooError(f"{what} {path} is a folder; give a file name ending in {suffix}")
    if os.path.lexists(path) and not path.exists():
        _broken_link(path, what, path)
    _check_parents(path, what)
    return path


def input_path(path: str | os.PathLike, what: str, *, folder: bool | None = None) -> Path:
    """``path`` as something that exists (a folder if ``folder``, a file if ``folder`` is False)."""
    path = _non_empty(path, what)
    if not path.exists():
        if os.path.lexists(path):
            _broken_link(path, what, path)
        raise ZooError(f"{what} {path} does not exist")
    if folder and not path.is_dir():
        raise ZooError(f"{what} {path} is a file; give a folder")
    if folder is False and path.is_dir():
        raise ZooError(f"{what} {path} is a folder; give a file")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise ZooError(f"{what} {path} cannot be read (permission denied)")
    return path


def _non_empty(path: str | os.PathLike, what: str) -> Path:
    if not str(path).strip():
        raise ZooError(f"{what}: expected a path, got an empty one")
    return Path(path)


def describe(error: OSError) -> str:
    """One line for an ``OSError``: which path and what went wrong."""
    where = " -> ".join(str(p) for p in (error.filename, error.filename2) if p is not None)
    what = error.strerror or str(error) or type(error).__name__
    return f"{where}: {what}" if where else what


# --------------------------------------------------------------------------- locks


class LockHeld(Exception):
    """Another process holds the lock; ``holder`` is what it wrote in the lock file."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def acquire_lock(path: Path, *, wait: bool) -> int:
    """A file descriptor holding an exclusive ``flock`` on the file now at ``path`` (made if missing).

    The file is opened without following a link (a link in its place is refused, not
    written through). With ``wait`` False a lock held elsewhere raises :class:`LockHeld`.
    A holder removes the file on the way out (:func:`release_lock`) while still holding
    it, so a process that opened it meanwhile finds another inode at ``path`` once it
    gets the lock, and tries again. ``PermissionError`` (a read-only folder) is left to
    the caller.
    """
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except PermissionError:
            raise
        except OSError as error:  # a folder or a symbolic link in the lock's place
            raise ZooError(f"cannot lock {path} ({error.strerror}); it should be a plain file zoo makes: "
                           "remove it") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise LockHeld(holder) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def release_lock(path: Path, fd: int) -> None:
    """Remove the lock file while still holding it, then let go (closing releases the lock)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(fd)


# --------------------------------------------------------------------------- one writer per output

LOCK_NAME = ".zoo-lock"
_held: dict[Path, int] = {}  # lock files this process holds, with how many callers hold each


@contextlib.contextmanager
def held(lock: str | os.PathLike, busy: str) -> Iterator[None]:
    """Hold the lock file ``lock`` (its folder made if missing) for this process, for as long as the block runs.

    Another zoo process holding it is refused at once with :class:`ZooError` ``busy``, formatted with
    ``holder`` (its pid and host). Re-entrant within a process. The lock file is removed on the way
    out, and so are the folders this call made that are empty then: a run refused early leaves nothing
    behind. A killed run leaves its lock file, which blocks no one (the kernel drops the lock).
    """
    lock = Path(lock).absolute()
    if lock in _held:
        _held[lock] += 1
        try:
            yield
        finally:
            _held[lock] -= 1
            if not _held[lock]:
                del _held[lock]
        return
    made = [p for p in (lock.parent, *lock.parent.parents) if not p.exists()]
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = acquire_lock(lock, wait=False)
    except LockHeld as holder:
        _remove_empty(made)
        raise ZooError(busy.format(holder=holder.holder or "unknown")) from None
    except BaseException:
        _remove_empty(made)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _held[lock] = 1
    try:
        yield
    finally:
        del _held[lock]
        release_lock(lock, fd)
        _remove_empty(made)


def _remove_empty(folders: Sequence[Path]) -> None:
    for folder in folders:  # innermost first
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def claimed(path: str | os.PathLike, what: str, *, force: bool, writes: Sequence[str] | None = None,
            lock: Path | None = None) -> Iterator[None]:
    """Hold the output ``path`` for this run: a file, or with ``writes`` a folder and the names this run
    writes in it. Refused in one line, before any work, when another zoo run writes there, or when what
    it would write is there already and ``force`` is not given: nothing already on disk is replaced
    unless asked. (What is written still goes through :func:`atomic_path`: a run killed mid-write
    leaves the old content or the new, never half.)"""
    path = Path(path)
    targets = [path / name for name in writes] if writes is not None else [path]
    lock = lock or (path / LOCK_NAME if writes is not None else path.parent / f".{path.name}{LOCK_NAME}")
    with held(lock, f"{what} {path} is being written by another zoo run ({{holder}}); wait for it to end, "
                    f"or choose another {what}"):
        there = [t for t in targets if os.path.lexists(t)]
        if there and not force:
            names = ", ".join(t.name for t in there[:3]) + (", ..." if len(there) > 3 else "")
            where = f"{path} already holds {names}" if writes is not None else f"{path} already exists"
            raise ZooError(f"{what} {where}; pass --force to replace {'them' if len(there) > 1 else 'it'}, "
                           f"or choose another {what}")
        yield


# --------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``.

    A crash or an error while writing leaves the old file (or none) in place
    and removes the temporary one. The suffix is kept so that writers that go
    by it (matplotlib, Pillow) pick the right format.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it takes ``path``'s place.

    The old folder is moved aside, the new one renamed into place, then the old
    one removed: a failure while building leaves the old folder untouched, and
    the swap itself is two renames.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not os.path.lexists(path):  # interrupted between the two renames
            os.replace(old, path)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def strict(payload: Any) -> Any:
    """``payload`` in JSON's own types, with ``null`` for every NaN or infinity (which strict
    parsers reject) and plain floats for numpy and JAX scalars."""
    if isinstance(payload, dict):
        return {str(k): strict(v) for k, v in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [strict(v) for v in payload]
    if isinstance(payload, (str, bool, type(None))):
        return payload
    if isinstance(payload, int):
        return int(payload)
    kind = getattr(getattr(payload, "dtype", None), "kind", "f")
    if kind == "b":
        return bool(payload)
    if kind in "iu":
        return int(payload)
    value = float(payload)
    return value if math.isfinite(value) else None


def dumps(payload: Any) -> str:
    """Strict JSON: ``allow_nan=False`` after :func:`strict`, so no ``NaN`` is ever written."""
    return json.dumps(strict(payload), indent=2, allow_nan=False)


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write strict JSON atomically: a crash leaves the old file or the new one, never half."""
    write_text(path, dumps(payload) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
