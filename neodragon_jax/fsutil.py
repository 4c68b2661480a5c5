"""File-system helpers shared by the writers: the modes a plain ``open()`` / ``mkdir()`` would give.

``tempfile.mkstemp`` creates files with mode 0600 and ``tempfile.mkdtemp`` folders with 0700, whatever the
umask. Every writer here stages its output in such a temporary file or folder and renames it into place,
so without a ``chmod`` the result would be unreadable to other users. :func:`chmod_like_open` gives a staged
file or folder the mode ``open()`` / ``mkdir()`` would have given it (0666 / 0777 minus the umask).
"""

from __future__ import annotations

import os
import threading

_lock = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _lock:  # elsewhere: set and restore (os.umask has no read-only form)
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """Mode of a new file (0666) or folder (0777) under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def chmod_like_open(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file or folder made by ``mkstemp`` / ``mkdtemp`` the mode ``open()`` / ``mkdir()`` would."""
    os.chmod(path, default_mode(directory))


__all__ = ["chmod_like_open", "current_umask", "default_mode"]
