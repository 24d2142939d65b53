"""File-level primitives of the cache: advisory locks, durable atomic writes, free-space checks.

Every file the cache writes is first complete in a temp name, fsynced, then renamed; a failed
write (ENOSPC, EIO, kill) leaves only a temp file, which is removed, never a half-written file in
place. Errors name the path and say what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator

from ..errors import CacheError

try:  # POSIX advisory locks; elsewhere clipdet runs without them (one writer at a time)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

#: bytes kept free beyond a write's own size before it starts (filesystem metadata, other writers)
FREE_SPACE_MARGIN = 8 * 2**20


class CacheWarning(UserWarning):
    """A problem with the cache that the run works around (damaged segment or rows, read-only, a wait)."""


#: seconds a process waits for a cache lock before it says who holds it (then it keeps waiting)
LOCK_NOTICE_ENV = "CLIPDET_LOCK_NOTICE_S"
LOCK_NOTICE_S = 5.0


class DiskFullError(CacheError):
    """The cache's filesystem has no room for a write; nothing partial was left behind."""

    exit_code = 2


def os_error_message(path: str, exc: OSError) -> str:
    """One line for an OSError on `path`: 'PATH: no space left on device (...)' and the like."""
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        return f"{path}: no space left on device (free space and run again; completed batches are kept)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{path}: not writable ({exc.strerror}); use --cache-readonly or another --cache"
    return f"{path}: {exc.strerror or exc}"


#: test hook: with CLIPDET_FAULT_KILL_AT=N in the environment, the process kills itself (SIGKILL) just
#: before the N-th rename, fsync, unlink or link the cache makes (crash-consistency tests step N through
#: every such point of a command)
FAULT_ENV = "CLIPDET_FAULT_KILL_AT"
_fault_steps = 0


def fault_point(step: str) -> None:
    """Count one durable-state step (`step`: rename, fsync, unlink, link); kill this process at the
    step CLIPDET_FAULT_KILL_AT names (unset: does nothing)."""
    at = os.environ.get(FAULT_ENV)
    if not at:
        return
    global _fault_steps
    _fault_steps += 1
    if str(_fault_steps) == at.strip():
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def replace(src: str, dst: str) -> None:
    """os.replace through the fault hook."""
    fault_point("rename")
    os.replace(src, dst)


def remove(path: str) -> None:
    """os.remove through the fault hook."""
    fault_point("unlink")
    os.remove(path)


def fsync(fd: int) -> None:
    """os.fsync through the fault hook."""
    fault_point("fsync")
    os.fsync(fd)


def link(src: str, dst: str) -> None:
    """os.link through the fault hook."""
    fault_point("link")
    os.link(src, dst)


def fsync_dir(path: str) -> None:
    """fsync a directory so a rename in it is durable (best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str, data: bytes | memoryview) -> None:
    """Write `data` to `path` atomically: temp file in the same folder, fsync, rename, fsync folder.

    On any failure the temp file is removed and the old `path` (if any) is untouched; an out-of-space
    failure raises DiskFullError naming `path`.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with removed_on_failure(tmp, name=path):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            fsync(fd)
        finally:
            os.close(fd)
        replace(tmp, path)
    fsync_dir(folder)


@contextlib.contextmanager
def removed_on_failure(tmp: str, name: str | None = None) -> Iterator[None]:
    """Remove the half-written `tmp` if the block fails; an out-of-space failure becomes
    DiskFullError naming `name` (default `tmp`)."""
    try:
        yield
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(os_error_message(name or tmp, e)) from None
        raise


def check_free_space(folder: str, need: int) -> None:
    """Fail early (DiskFullError) when `folder`'s filesystem has less than `need` bytes + margin free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < need + FREE_SPACE_MARGIN:
        raise DiskFullError(
            f"{folder}: no space left on device (this write needs about {_mb(need)} MB, "
            f"{_mb(free)} MB free); free space and run again"
        )


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs (a PermissionError means it does, as another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def flock(path: str, exclusive: bool, create_dir: bool = False, create: bool = True) -> Iterator[bool]:
    """flock(2) on `path`; yields whether a lock is held. Readers of a cache they cannot write
    (read-only mount, someone else's folder) go on without a lock rather than fail; `create=False`
    never creates the lock file (read-only use). A holder records its pid in the file; a process kept
    waiting over LOCK_NOTICE_S seconds warns once, naming that pid (and whether it is stopped), and
    keeps waiting."""
    if create_dir:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield False
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644) if create else os.open(path, os.O_RDONLY)
    except OSError as e:
        if exclusive:
            raise CacheError(os_error_message(path, e).replace("not writable", "cannot create the cache lock file")) \
                from None
        yield False
        return
    try:
        _lock_waiting(fd, path, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if create:
            with contextlib.suppress(OSError):  # who holds it, for those kept waiting
                os.pwrite(fd, f"{os.getpid():<10d}\n".encode(), 0)
        yield True
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _lock_waiting(fd: int, path: str, mode: int) -> None:
    """flock(fd, mode), blocking; after LOCK_NOTICE_S seconds a warning says what it waits for."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    import threading

    delay = float(os.environ.get(LOCK_NOTICE_ENV) or LOCK_NOTICE_S)
    timer = threading.Timer(delay, lambda: _warn_waiting(fd, path, delay))
    timer.daemon = True
    timer.start()
    try:
        fcntl.flock(fd, mode)
    finally:
        timer.cancel()


def _warn_waiting(fd: int, path: str, delay: float) -> None:
    import warnings

    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    if text.isdigit():
        pid = int(text)
        state = _process_state(pid)
        holder = f"pid {pid}" + (f", {state}" if state else "")
        hint = f" (resume it with kill -CONT {pid}, or end it)" if state == "stopped" else ""
    else:
        holder, hint = "another process", ""
    warnings.warn(f"{path}: waited {delay:g} s for the cache lock, held by {holder}{hint}; still waiting",
                  CacheWarning, stacklevel=2)


def _process_state(pid: int) -> str:
    """'stopped' for a stopped (SIGSTOP, ^Z) process, 'not running' for a gone one, else ''."""
    if not pid_alive(pid):
        return "not running"
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
    return "stopped" if state in ("T", "t") else ""


@contextlib.contextmanager
def try_flock(path: str) -> Iterator[bool]:
    """Non-blocking exclusive flock on `path`; yields False (without waiting) when another holds it."""
    if fcntl is None:  # pragma: no cover
        yield True
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
