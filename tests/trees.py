"""Directory trees no ordinary program makes, for cleanup and mayhem tests."""

from __future__ import annotations

import os
from pathlib import Path


def deep_tree(root: Path, depth: int, name: str = "d") -> None:
    """A chain of ``depth`` nested directories built with relative opens (the
    full path is far past PATH_MAX), with a file at the bottom."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(os.open("bottom", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    os.close(fd)
