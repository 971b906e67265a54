"""Replacing a served tree atomically: a linked copy to add files to, then an exchange.

Public API::

    link_tree(src, dst)          # dst: a new tree of hard links to src's files
    exchange(a, b)               # renameat2(RENAME_EXCHANGE): a and b trade places

Guarantees:

* **Nothing served is written.** :func:`link_tree` makes directories of its
  own and hard links to the served files (their inodes, never copies): files
  added to the copy, or replaced in it by a rename, never touch the served
  tree. Only directories and regular files are linked; anything else is
  left out (an unpacked tree has nothing else).
* **Atomic.** :func:`exchange` swaps two directory entries in one system
  call: at every instant the served name is the whole old tree or the whole
  new one, never missing, never half. A runtime that has a file of the old
  tree open keeps reading it (same inode); one that opens a path afterwards
  finds the same bytes in the new tree. Rejected: two renames (the name is
  missing in between), a symlink flipped by rename (the served path would
  have to become a link, and every reader would resolve it on each open).
* **Iterative.** Any depth, no recursion.

Linux only (``renameat2``, 3.15+; ext4, xfs, btrfs, tmpfs). Where the
filesystem refuses the exchange, :func:`exchange` raises ``OSError``
(``EINVAL``) and the caller keeps the tree it has. Blocking: call from a thread.
"""

from __future__ import annotations

import ctypes
import os
import stat
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 1 << 1
_LIBC = ctypes.CDLL(None, use_errno=True)


def exchange(a: Path, b: Path) -> None:
    """Atomically swap the directory entries ``a`` and ``b`` (both must exist)."""
    rc = _LIBC.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"exchange {a} and {b}: {os.strerror(err)}")


def link_tree(src: Path, dst: Path) -> int:
    """Fill the new empty directory ``dst`` with ``src``'s directories (0755) and
    hard links to its regular files; return how many files were linked."""
    linked = 0
    todo = [""]
    while todo:
        rel = todo.pop()
        with os.scandir(os.path.join(src, rel)) as entries:
            for entry in entries:
                sub = os.path.join(rel, entry.name)
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    os.mkdir(os.path.join(dst, sub), 0o755)
                    os.chmod(os.path.join(dst, sub), 0o755)  # whatever the umask
                    todo.append(sub)
                elif stat.S_ISREG(mode):
                    os.link(entry.path, os.path.join(dst, sub), follow_symlinks=False)
                    linked += 1
    return linked
