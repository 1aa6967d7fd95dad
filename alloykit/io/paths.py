"""Checks on paths before anything is read or written: an output must never overwrite, contain
or sit inside an input, and OS errors on paths become messages that name the path."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

from alloykit.errors import CheckpointError, OutputError


def resolved(path: str | os.PathLike) -> Path:
    """``path`` with every symlink resolved (also for a path that does not exist yet)."""
    try:
        return Path(path).resolve(strict=False)
    except RuntimeError as e:  # Python < 3.13 reports a symlink loop this way
        raise CheckpointError(f"{path}: symbolic link loop ({e})") from None
    except OSError as e:
        raise CheckpointError(describe_os_error(e, path)) from None


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_location(output: str | os.PathLike, protected: Iterable[tuple[str, Path, bool]]) -> None:
    """Refuse an ``output`` that is, contains or (for folder inputs) lies inside a protected path.

    ``protected``: ``(what, path, is_folder)`` for each input (``"model"``, ``"base model"``,
    ``"recipe"``, ``"statistics"``, …). A folder input is protected with everything below it; a
    file input as the file itself (an output folder may sit beside a ``.pt`` file). Checked
    with symlinks resolved, with or without ``--force``: ``--force`` may replace an old
    output, never an input."""
    out = resolved(output)

    def shown(given: str | os.PathLike, real: Path) -> str:
        return f"{given} (resolved: {real})" if real != Path(given).absolute() else str(given)

    for what, path, is_folder in protected:
        p = resolved(path)
        if _inside(p, out):
            relation = "is" if p == out else "contains"
            raise OutputError(
                f"output {shown(output, out)} {relation} the {what} {shown(path, p)}; writing there "
                "would destroy an input. Choose an output folder elsewhere."
            )
        if is_folder and _inside(out, p):
            raise OutputError(
                f"output {shown(output, out)} lies inside the {what} folder {shown(path, p)}; writing "
                "there would mix the merge into an input model. Choose an output folder elsewhere."
            )
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {output} exists and is a file, not a folder; choose another path")


def describe_os_error(e: OSError, path: str | os.PathLike | None = None) -> str:
    """One line for an OS error: what happened, to which path, and what to do."""
    where = path if path is not None else (e.filename or "")
    code = e.errno
    if code == errno.ENOSPC:
        return f"{where}: no space left on the device; free space or write elsewhere"
    if code == errno.EDQUOT:
        return f"{where}: disk quota exceeded; free space or write elsewhere"
    if code in (errno.EACCES, errno.EPERM):
        return f"{where}: permission denied; check the path's permissions or choose another"
    if code == errno.EROFS:
        return f"{where}: the file system is read-only; write elsewhere"
    if code == errno.ELOOP:
        return f"{where}: symbolic link loop; fix the link"
    if code == errno.ENOENT:
        return f"{where}: no such file or folder"
    if code == errno.ENOTDIR:
        return f"{where}: a part of this path is a file, not a folder"
    if code == errno.EISDIR:
        return f"{where}: is a folder; a file was expected"
    if code == errno.EIO:
        return f"{where}: input/output error from the device (a failing disk or network mount?)"
    return f"{where}: {e.strerror or e}"
