"""Crash-safe files in a work dir: atomic writes, the newest complete checkpoint, the work-dir lock.

- :func:`commit_file` / :func:`atomic_write_bytes` / :func:`atomic_write_text`: a file appears under
  its final name only complete (temporary file in the same folder, fsync, rename, fsync of the
  folder), so a crash leaves either the previous content or the new one.
- :func:`find_resumable_checkpoint`: what ``--resume`` without a file resumes from: the newest
  ``epoch_N.pth`` / ``iter_N.pth`` that is a complete torch archive (``last_checkpoint`` is a hint,
  not trusted blindly).
- :class:`WorkDirLock`: one training per work dir. The lock is an ``flock`` on ``<work_dir>/.lock``
  (released by the kernel when the holder dies, even by SIGKILL), and the file names the holder.
"""
import datetime
import errno
import fcntl
import json
import os
import os.path as osp
import re
import socket
import sys
import zipfile
from typing import List, Optional, Tuple

__all__ = ["TEMP_MARK", "temp_path", "commit_file", "atomic_write_bytes", "atomic_write_text",
           "remove_stale_temps", "is_complete_checkpoint", "find_resumable_checkpoint", "WorkDirLock",
           "WorkDirBusyError"]

TEMP_MARK = ".tmp-"
_CKPT_RE = re.compile(r"^(epoch|iter)_(\d+)\.pth$")


def temp_path(path: str) -> str:
    """A hidden sibling of ``path`` that only this process writes: ``.<name>.tmp-<pid>``."""
    folder, name = osp.split(osp.abspath(path))
    return osp.join(folder, f".{name}{TEMP_MARK}{os.getpid()}")


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def commit_file(tmp: str, path: str) -> None:
    """Flush ``tmp`` to disk and rename it to ``path`` (atomic on POSIX within one file system)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(osp.dirname(osp.abspath(path)))


def atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        commit_file(tmp, path)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: str) -> List[str]:
    """Remove the temporary files that interrupted atomic writes left in ``folder``: those of
    processes no longer running (and this process's own)."""
    removed = []
    if not osp.isdir(folder):
        return removed
    for name in os.listdir(folder):
        if not (name.startswith(".") and TEMP_MARK in name):
            continue
        pid = name.rsplit(TEMP_MARK, 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        path = osp.join(folder, name)
        if osp.isfile(path):
            os.remove(path)
            removed.append(path)
    return removed


def is_complete_checkpoint(path: str) -> bool:
    """True when ``path`` is a whole torch zip archive (a truncated or empty file has no central
    directory at its end). Cheap: reads the archive's index, not the tensors."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("data.pkl") for n in zf.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _checkpoint_files(folder: str) -> List[Tuple[int, str]]:
    out = []
    if osp.isdir(folder):
        for name in os.listdir(folder):
            m = _CKPT_RE.match(name)
            if m:
                out.append((int(m.group(2)), osp.join(folder, name)))
    return out


def find_resumable_checkpoint(work_dir: str, logger=None) -> Optional[str]:
    """The newest complete ``epoch_N.pth`` / ``iter_N.pth`` in ``work_dir`` (and in the folder
    ``last_checkpoint`` points to), or None when the work dir holds no checkpoint at all.

    Raises RuntimeError when checkpoint files exist but none of them is complete."""
    folders = [osp.abspath(work_dir)]
    hint = osp.join(work_dir, "last_checkpoint")
    kind = None
    if osp.isfile(hint):
        with open(hint) as f:
            named = f.read().strip()
        if named and osp.dirname(osp.abspath(named)) not in folders:
            folders.append(osp.dirname(osp.abspath(named)))
        m = _CKPT_RE.match(osp.basename(named))
        kind = m.group(1) if m else None
    found = {c for folder in folders for c in _checkpoint_files(folder)}
    if kind and any(osp.basename(p).startswith(kind + "_") for _, p in found):
        # epoch and iteration numbers do not compare: keep to the kind the run last wrote
        found = {(n, p) for n, p in found if osp.basename(p).startswith(kind + "_")}
    candidates = sorted(found, reverse=True)
    broken = []
    for _, path in candidates:
        if is_complete_checkpoint(path):
            if broken and logger is not None:
                logger.warning(f"skipped incomplete checkpoint file(s) {broken}; resuming from {path}")
            return path
        broken.append(path)
    if broken:
        raise RuntimeError(f"--resume: no complete checkpoint in {work_dir!r}; these files are truncated or "
                           f"not torch checkpoints: {broken}. Remove them, or start without --resume.")
    return None


class WorkDirBusyError(RuntimeError):
    """Another live process trains in this work dir."""


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class WorkDirLock:
    """Exclusive use of a work dir by one training (rank 0 takes it; other ranks do nothing).

    ``acquire`` raises :class:`WorkDirBusyError` naming the holder (pid, host, start time, command)
    when a live process holds it, and takes over, with a warning, a lock file left by a process
    that died. ``release`` (also on normal interpreter exit) unlinks the file.
    """

    NAME = ".lock"

    def __init__(self, work_dir: str):
        self.work_dir = osp.abspath(work_dir)
        self.path = osp.join(self.work_dir, self.NAME)
        self._fd: Optional[int] = None
        self.stale_holder: Optional[dict] = None

    @staticmethod
    def describe(holder: dict) -> str:
        if not holder:
            return "an unknown process"
        return (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')} "
                f"(command: {holder.get('command')})")

    def _read(self, fd: int) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            data = os.read(fd, 65536)
            return json.loads(data.decode("utf-8")) if data else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "WorkDirLock":
        if _rank() != 0 or self._fd is not None:
            return self
        os.makedirs(self.work_dir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = self._read(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise WorkDirBusyError(
                    f"work dir {self.work_dir!r} is in use by {self.describe(holder)}; wait for that run to "
                    f"finish or stop it, or train into another --work-dir (lock file: {self.path})") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder unlinked the file while we waited: lock the new one
                os.close(fd)
                continue
            break
        previous = self._read(fd)
        if previous:
            self.stale_holder = previous
        me = dict(pid=os.getpid(), host=socket.gethostname(),
                  started=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                  command=" ".join([osp.basename(sys.argv[0])] + sys.argv[1:]))
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode("utf-8"))
        os.fsync(fd)
        self._fd = fd
        import atexit
        atexit.register(self.release)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
