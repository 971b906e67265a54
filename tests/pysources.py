"""Python source trees for the bytecode tests: a handler, a hinted package, vendored
modules and one syntax error."""

from __future__ import annotations


def package_files(hinted: int = 150, rest: int = 250) -> dict[str, bytes]:
    files = {
        "handler.py": b"import app.core\n\ndef handler(event, context):\n    return 1\n",
        "app/__init__.py": b"",
        "app/core/__init__.py": b"from . import m0\n",
        "app/broken.py": b"def broken(:\n",
        "data/table.csv": b"a;b\n1;2\n",
    }
    for i in range(hinted):
        files[f"app/core/m{i}.py"] = f"VALUE = {i}\n\ndef f(x):\n    return x * {i}\n".encode()
    for i in range(rest):
        files[f"vendor/lib{i // 50}/m{i}.py"] = f"def g():\n    return {i}\n".encode()
    return files
