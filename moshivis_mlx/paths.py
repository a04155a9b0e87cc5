"""Which paths a run may read and write, decided before any work starts.

Two rules, one helper each:

* `check_outputs`: nothing a run writes may be something it reads. Every output is
  resolved (symlinks, `..`, hard links) and compared with every input: an output that is
  an input, lies inside an input directory (a bundle), holds an input, or is another
  output is refused in one line, so `--output-wav` equal to `--input-wav` never overwrites
  the question. `check_writable` then makes sure each output can be written at all (its
  directory exists and takes a new file), so a read-only disk is reported before a 7B
  model has loaded, not after.
* `inside`: a file name that a bundle or a repository gives (its index, its config.json)
  must name a file inside it: no absolute path, no `..`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from .errors import MoshivisError, UsageError, WeightsError


def inside(root: str | Path, name: object, what: str) -> Path:
    """`root / name` for a file name read from a file of `root` (`what` says which key of
    which file): refused unless it is a relative path that stays inside `root`."""
    if not isinstance(name, str) or not name.strip():
        raise WeightsError(f"{what}: expected a file name, got {name!r}")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if (posix.is_absolute() or windows.is_absolute() or windows.drive or "\\" in name
            or "\0" in name or ".." in posix.parts):
        raise WeightsError(f"{what}: {name!r} points outside {root} (only files inside it "
                           f"are read)")
    return Path(root) / posix


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _same(a: Path, b: Path) -> bool:
    if _resolved(a) == _resolved(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _within(path: Path, root: Path) -> bool:
    """Whether `path` is `root` or lies below it (after resolving both)."""
    path, root = _resolved(path), _resolved(root)
    return path == root or root in path.parents


def check_outputs(outputs: dict[str, Path | None], inputs: dict[str, Path | None],
                  replaced: bool = False) -> None:
    """Refuses (UsageError, exit 2) any output that is an input, lies inside an input
    directory, or is another output; with `replaced` (output directories replaced as a
    whole), also one that holds an input. Keys are what the user calls each path (an
    option, "the bundle")."""
    outs = {k: Path(v) for k, v in outputs.items() if v is not None}
    ins = {k: Path(v) for k, v in inputs.items() if v is not None}
    for out_name, out in outs.items():
        for in_name, inp in ins.items():
            if _same(out, inp):
                raise UsageError(f"{out_name} {out} is {in_name} {inp}: it would be overwritten",
                                 f"choose another path for {out_name}")
            if inp.is_dir() and _within(out, inp):
                raise UsageError(f"{out_name} {out} is inside {in_name} {inp}: writing there "
                                 f"would change it", f"choose a path outside {inp}")
            if replaced and out.is_dir() and _within(inp, out):
                raise UsageError(f"{out_name} {out} holds {in_name} {inp}: replacing it would "
                                 f"delete it", f"choose another path for {out_name}")
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if _same(outs[a], outs[b]):
                raise UsageError(f"{a} and {b} are the same file {outs[a]}",
                                 f"give {b} a path of its own")


def _probe(directory: Path) -> None:
    """Creates and removes a file in `directory`: the only test that a read-only disk,
    a missing permission or an immutable folder cannot fool."""
    fd, name = tempfile.mkstemp(prefix=".moshivis-probe-", dir=directory)
    os.close(fd)
    os.unlink(name)


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__


def check_writable(path: str | Path, what: str, directory: bool = False,
                   fix: str | None = None) -> None:
    """Before any work: `path` (a file, or with `directory` a folder that may not exist
    yet) can be written. A MoshivisError (exit 1) "cannot <what> <path>: why; fix"."""
    path = Path(path).expanduser()

    def refuse(why: str, fix: str | None = fix) -> MoshivisError:
        return MoshivisError(f"cannot {what} {path}: {why}", fix)

    if directory:
        if path.exists() and not path.is_dir():
            raise refuse("it is a file, not a directory", fix or "choose a directory")
        base = path
        while not base.exists() and base != base.parent:
            base = base.parent
        if not base.is_dir():
            raise refuse(f"{base} is not a directory")
    else:
        if path.is_dir():
            raise refuse("it is a directory", fix or "give a file name")
        if path.exists() and not path.is_file():
            raise refuse("not a regular file")
        base = _resolved(path).parent
        if not base.is_dir():
            raise refuse(f"directory {base} does not exist")
        if path.exists() and not os.access(path, os.W_OK):
            raise refuse("permission denied")
    try:
        _probe(base)
    except OSError as e:
        raise refuse(f"{base}: {_why(e)}", fix or "choose a path on a writable disk") from None


def check_readable_file(path: str | Path, what: str, error: type[MoshivisError]) -> Path:
    """An input file given on the command line: it exists and is a regular file (a pipe
    or a device would block or cannot be read twice). `error` is the class to raise."""
    path = Path(path).expanduser()
    if not path.exists():
        raise error(f"{path}: no such file")
    if path.is_dir():
        raise error(f"{path}: is a directory, expected {what}")
    if not path.is_file():
        raise error(f"{path}: not a regular file (a pipe or a device), expected {what}",
                    "save it to a file first")
    return path
