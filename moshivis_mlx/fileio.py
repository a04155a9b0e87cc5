"""Writing files so that no stop, crash or second writer leaves a broken one.

* `atomic_write`, `atomic_writer`: the new content goes to a temporary file next to the
  target, which is then renamed over it: a reader (or a run killed at any instant) sees
  the old file or the new one, never half of one.
* `staged_dir`: a directory made as a whole (a converted bundle). It is built in
  `.NAME.partial` next to `NAME` and renamed into place when complete; any exception,
  Ctrl-C, SIGTERM or SIGHUP (see signals.py) removes it. While it is built, `.NAME.lock`
  is held (flock), so a second writer to the same `NAME` is refused at once instead of
  racing; what a killed run (SIGKILL, power loss) left behind is removed by the next run
  that takes the lock, and `sweep` clears a whole cache directory of such remains.
* `output_lock`: the same lock for an output written in place over a long run (an
  evaluation's or a training's `--out`).
* `fingerprint`: what a folder of weights holds, in a few reads (a bundle rebuilt at the
  same path is another bundle; a copy of it is the same).
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from .errors import MoshivisError
from .signals import shielded

PARTIAL, OLD, LOCK = ".partial", ".old", ".lock"
_building: set[Path] = set()
"""Stages being built: removed at exit if the thread building them never finished."""


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Replaces `path` with `data` in one step (temporary file + rename)."""
    with atomic_writer(path, "w" if isinstance(data, str) else "wb") as f:
        f.write(data)


@contextmanager
def atomic_writer(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A file to write `path`'s new content into; it replaces `path` when the block
    completes, and nothing changes if the block fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: no empty file after a crash
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        _remove(Path(tmp))
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    """Removes a file or a directory tree, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass


def _names(out: Path) -> tuple[Path, Path, Path]:
    return (out.with_name(f".{out.name}{PARTIAL}"), out.with_name(f".{out.name}{OLD}"),
            out.with_name(f".{out.name}{LOCK}"))


class Locked(MoshivisError):
    """Another process is writing the same output: nothing wrong with the inputs, so the
    plain failure exit code (1), whichever tool refuses."""


WAIT = "wait for it to finish, then try again"
"""The advice of a lock's refusal unless the caller has a better one (an option that names
another output)."""


def _take_lock(lock: Path, out: Path, fix: str = WAIT) -> int:
    """An exclusive flock on `lock` (created if need be), or `Locked` saying `fix`. Retries
    when the file was replaced between opening and locking (its owner finished meanwhile)."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise Locked(f"{out} is being written by another process"
                         f"{f' (pid {owner})' if owner.isdigit() else ''}", fix) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        os.close(fd)


@contextmanager
def output_lock(out: str | Path, fix: str = WAIT) -> Iterator[Path]:
    """Holds `.NAME.lock` next to `out` (a run's output directory, written in place over
    a long time) for the block: a second run on the same output is refused at once with
    `Locked` (saying `fix`) instead of interleaving its files with the first's. The lock
    dies with the process, whatever kills it. Yields `out`, absolute."""
    out = Path(os.path.abspath(Path(out).expanduser()))
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = _names(out)[2]
    fd = _take_lock(lock, out, fix)
    try:
        yield out
    finally:
        with shielded():
            _remove(lock)
            os.close(fd)


FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK = 16, 1 << 16


def fingerprint(folder: str | Path, times: bool = False) -> str:
    """A digest of the regular files directly in `folder`: each one's name and size, and
    its content where it is small, else 16 blocks of 64 KiB spread over it (the header of
    a safetensors file is the first). A few MB read whatever the weights weigh. With
    `times`, the modification times count too (a cache key: a file edited in place with
    its size unchanged is then another file)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        st = path.stat()
        digest.update(f"{path.name} {st.st_size}{f' {st.st_mtime_ns}' if times else ''}\n"
                      .encode())
        with open(path, "rb") as f:
            span = FINGERPRINT_BLOCKS * FINGERPRINT_BLOCK
            if st.st_size <= span:
                digest.update(f.read())
                continue
            for k in range(FINGERPRINT_BLOCKS):
                f.seek(k * (st.st_size - FINGERPRINT_BLOCK) // (FINGERPRINT_BLOCKS - 1))
                digest.update(f.read(FINGERPRINT_BLOCK))
    return digest.hexdigest()[:16]


def _recover(out: Path, stage: Path, old: Path) -> None:
    """Under the lock: clears what a killed run left, and puts back a bundle that a run
    killed halfway through replacing it had moved aside."""
    _remove(stage)
    if old.exists() or old.is_symlink():
        if not out.exists():
            os.rename(old, out)
        else:
            _remove(old)


@contextmanager
def staged_dir(out: str | Path, check: Callable[[Path], None] | None = None,
               fix: str = WAIT) -> Iterator[Path]:
    """Yields an empty directory that becomes `out` when the block completes.

    `check(out)` runs once the lock is held (is `out` there, may it be replaced?): two
    runs cannot both pass it. An `out` that exists when the block completes is replaced
    (moved aside, the new one renamed in, the old one removed). A second writer is
    refused with `Locked`, saying `fix`."""
    out = Path(os.path.abspath(Path(out).expanduser()))
    out.parent.mkdir(parents=True, exist_ok=True)
    stage, old, lock = _names(out)
    fd = _take_lock(lock, out, fix)
    try:
        _recover(out, stage, old)
        if check is not None:
            check(out)
        stage.mkdir(mode=0o777)  # the umask applies: a bundle others may read
        _building.add(stage)
        try:
            yield stage
            with shielded():
                if out.exists() or out.is_symlink():
                    os.rename(out, old)
                    os.rename(stage, out)
                    _remove(old)
                else:
                    os.rename(stage, out)
        except BaseException:
            with shielded():
                _remove(stage)
            raise
        finally:
            _building.discard(stage)
    finally:
        with shielded():
            _remove(lock)
            os.close(fd)


def sweep(directory: str | Path) -> None:
    """Removes the remains of killed runs in `directory` (a cache of staged outputs):
    each `.NAME.partial` whose lock nobody holds."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for stage in directory.glob(f".*{PARTIAL}"):
        out = stage.with_name(stage.name[1: -len(PARTIAL)])
        _, old, lock = _names(out)
        try:
            fd = _take_lock(lock, out)
        except (Locked, OSError):
            continue  # being written right now (or not ours to clean)
        try:
            _recover(out, stage, old)
        except OSError:
            pass
        finally:
            _remove(lock)
            os.close(fd)


@atexit.register
def _remove_unfinished() -> None:
    """A stage still being built when the interpreter exits (its thread was a daemon, the
    main thread was stopped) is removed rather than left behind."""
    for stage in list(_building):
        _remove(stage)
