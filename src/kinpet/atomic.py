"""Atomic writes: every output is written under a temporary name beside it and renamed
when complete, so that no reader (or rerun) ever sees a half-written file.

The temporary's name says whose it is, ``.<stem>.kinpet-tmp-<host>-<pid><suffixes>``, so
that a later write of the same file removes what a killed writer left (gigabytes at paper
size).
"""

from __future__ import annotations

import glob
import os
import re
import socket
from contextlib import contextmanager
from pathlib import Path

TEMP_TAG = ".kinpet-tmp-"


def _split_suffix(name: str) -> tuple[str, str]:
    # Writers choose the format by the name's end (.nii.gz, .npz, .pdf): keep it.
    lowered = name.lower()
    for compound in (".nii.gz", ".tsv.gz", ".tar.gz"):
        if lowered.endswith(compound) and len(name) > len(compound):
            return name[: -len(compound)], name[-len(compound) :]
    stem, dot, ext = name.rpartition(".")
    return (stem, dot + ext) if dot and stem else (name, "")


def temporary_path(path, pid: int | None = None) -> Path:
    """The temporary name of ``path`` for process ``pid`` (default: this one) on this host."""
    path = Path(path)
    stem, suffix = _split_suffix(path.name)
    pid = os.getpid() if pid is None else int(pid)
    return path.with_name(f".{stem}{TEMP_TAG}{socket.gethostname()}-{pid}{suffix}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path) -> list[Path]:
    """Remove the temporaries of ``path`` (:func:`temporary_path`) left by processes of this
    host that no longer run, and this process's own; return what was removed.

    Temporaries of other hosts (a shared file system) are kept: their writers may run.
    """
    path = Path(path)
    stem, suffix = _split_suffix(path.name)
    pattern = re.compile(
        rf"\.{re.escape(stem)}{re.escape(TEMP_TAG)}(?P<host>.+)-(?P<pid>\d+){re.escape(suffix)}"
    )
    host, removed = socket.gethostname(), []
    if not path.parent.is_dir():
        return removed
    for candidate in path.parent.glob(f".{glob.escape(stem)}{TEMP_TAG}*"):
        match = pattern.fullmatch(candidate.name)
        if not match or match["host"] != host:
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or not _pid_alive(pid):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def new_temporary(path) -> Path:
    """Prepare the temporary name of ``path`` (its folder made, stale temporaries removed).

    The writer creates the file with a plain ``open()``, so the output gets the mode any
    new file gets (0666 minus the umask), not ``mkstemp``'s 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    return temporary_path(path)


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it to ``path`` only on success.

    The temporary name (:func:`temporary_path`) keeps the file's suffixes (``.nii.gz``,
    ``.npz``) so that writers choosing the format by name behave the same. A failed write
    leaves nothing behind; a killed one leaves a temporary that the next write of ``path``
    removes. The output's mode is that of a plain ``open()`` (0666 minus the umask).
    """
    path = Path(path)
    tmp = new_temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
