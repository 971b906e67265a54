"""Removing what we (or a crash, an operator, a hostile archive) left on disk.

:func:`remove_tree` removes a file, a link or a tree of any depth under a
directory we own: links are removed, never followed; paths past ``PATH_MAX``
and directories without permissions are handled; it never recurses and holds
a bounded number of descriptors whatever the depth; it never raises for what
it finds (it logs and answers False).

Rejected: ``shutil.rmtree`` recurses per level (stops near depth 1,000) and
builds full paths that fail past ``PATH_MAX``; here every operation is
relative to an open directory, the tree flattened one level at a time.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(path: Path) -> bool:
    """Remove ``path`` (a file, a link or a directory tree); True when it is gone.

    Links are removed, never followed; nothing outside ``path`` is touched.
    Safe to call on a path that does not exist. Blocking: call from a thread.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError as exc:
        log.error("cannot remove %s: %s", path, exc)
        return False
    try:
        if stat.S_ISDIR(st.st_mode):
            _remove_dir(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("cannot remove %s: %s", path, exc)
        return False
    return True


def _remove_dir(path: Path) -> None:
    root = _open_dir(path.name, _parent_fd(path))
    try:
        while _flatten_once(root):
            pass
    finally:
        os.close(root)
    parent = _parent_fd(path)
    try:
        os.rmdir(path.name, dir_fd=parent)
    finally:
        os.close(parent)


def _parent_fd(path: Path) -> int:
    return os.open(path.parent if str(path.parent) else ".", _DIR_FLAGS)


def _open_dir(name: str, parent: int) -> int:
    """Open a subdirectory without following links; grant ourselves access if
    its mode forbids it (a leftover made with mode 000). Closes ``parent``."""
    try:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except PermissionError:
            os.chmod(name, 0o700, dir_fd=parent, follow_symlinks=False)
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
    finally:
        os.close(parent)


def _flatten_once(root: int) -> bool:
    """One pass over the top level of ``root``: unlink files and links, and for
    each directory, move its subdirectories up to the top level, unlink its
    files, and remove it. Returns True while directories remain."""
    dirs = _unlink_files(root)
    for name in dirs:
        child = _open_dir(name, os.dup(root))
        try:
            for sub in _unlink_files(child):
                os.rename(sub, _fresh_name(), src_dir_fd=child, dst_dir_fd=root)
        finally:
            os.close(child)
        os.rmdir(name, dir_fd=root)
    return bool(dirs)


def _unlink_files(dir_fd: int) -> list[str]:
    """Unlink every non-directory entry of ``dir_fd``; return the directories' names."""
    dirs = []
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                dirs.append(entry.name)
            else:
                os.unlink(entry.name, dir_fd=dir_fd)
    return dirs


def _fresh_name() -> str:
    return f".rm-{secrets.token_hex(8)}"
