"""A corpus of real function packages, built from PyPI wheels.

Command (from the repository root)::

    .venv/bin/python bench/corpus.py            # writes bench/out/corpus/*.zip
    .venv/bin/python bench/corpus.py --start    # the start corpus (bench/coldstart.py)

Each package is a deployment zip the way AWS Lambda takes it: the wheels of
the function's dependencies unpacked at the zip root (``*.data/`` trees
skipped, as ``pip install --target`` would place them elsewhere) plus a
``handler.py``, deflated at level 6 like ``zip -r``. Wheels are downloaded
once with ``pip download`` (manylinux x86_64, CPython 3.11) into
``bench/out/wheels/<package>/``; later runs reuse them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out"

FLASK_HANDLER = b"""\
from flask import Flask, jsonify

app = Flask(__name__)


@app.get("/hello/<name>")
def hello(name):
    return jsonify(greeting=f"hello {name}")


def handler(event, context):
    with app.test_client() as client:
        return client.get(event.get("path", "/hello/world")).get_json()
"""

ETL_HANDLER = b"""\
import csv
import io

import boto3
import requests


def handler(event, context):
    rows = requests.get(event["url"], timeout=10).text
    out = io.StringIO()
    csv.writer(out).writerows(row.split(";") for row in rows.splitlines())
    boto3.client("s3").put_object(Bucket=event["bucket"], Key=event["key"], Body=out.getvalue())
    return {"rows": rows.count("\\n")}
"""

NUMPY_HANDLER = b"""\
import numpy as np


def handler(event, context):
    values = np.asarray(event["values"], dtype=float)
    return {"mean": float(values.mean()), "p99": float(np.percentile(values, 99))}
"""

PYDANTIC_HANDLER = b"""\
from pydantic import BaseModel, Field


class Order(BaseModel):
    id: int
    items: list[str] = Field(default_factory=list)
    total: float = 0.0


def handler(event, context):
    return Order.model_validate(event).model_dump()
"""

PANDAS_HANDLER = b"""\
import pandas as pd


def handler(event, context):
    frame = pd.DataFrame(event["rows"])
    return frame.describe().to_dict()
"""

SKLEARN_HANDLER = b"""\
import numpy as np
from sklearn.linear_model import LogisticRegression


def handler(event, context):
    x = np.asarray(event["x"], dtype=float)
    y = np.asarray(event["y"])
    model = LogisticRegression().fit(x, y)
    return {"classes": model.classes_.tolist(), "score": float(model.score(x, y))}
"""

PACKAGES: dict[str, tuple[list[str], bytes]] = {
    "flask-app": (["flask"], FLASK_HANDLER),
    "etl-requests-boto3": (["requests", "boto3"], ETL_HANDLER),
    "numpy-stats": (["numpy"], NUMPY_HANDLER),
}
"""The unpack corpus (``bench/runnable.py``, ``bench/packages.py``)."""

START_PACKAGES: dict[str, tuple[list[str], bytes]] = {
    "pydantic-api": (["pydantic"], PYDANTIC_HANDLER),
    "pandas-report": (["pandas"], PANDAS_HANDLER),
    "sklearn-model": (["scikit-learn"], SKLEARN_HANDLER),
}
"""Packages whose starts import much Python (``bench/coldstart.py``): pandas +
numpy is ~98 MiB unpacked, scikit-learn + scipy + numpy ~200 MiB."""


def download(requirements: list[str], dest: Path) -> list[Path]:
    """The wheels of ``requirements`` and their dependencies, downloaded once."""
    dest.mkdir(parents=True, exist_ok=True)
    wheels = sorted(dest.glob("*.whl"))
    if wheels:
        return wheels
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(dest)]
        + ["--only-binary=:all:", "--platform", "manylinux2014_x86_64"]
        + ["--python-version", "3.11", "--implementation", "cp", *requirements],
        check=True,
    )
    return sorted(dest.glob("*.whl"))


def build_zip(wheels: list[Path], handler: bytes, dst: Path) -> int:
    """Write the deployment zip; return its size."""
    seen: set[str] = set()
    tmp = dst.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as out:
        out.writestr(_member("handler.py", 0o644), handler)
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as src:
                for info in src.infolist():
                    top = info.filename.split("/", 1)[0]
                    if top.endswith(".data") or info.filename in seen or info.is_dir():
                        continue
                    seen.add(info.filename)
                    mode = (info.external_attr >> 16) & 0o777 or 0o644
                    out.writestr(_member(info.filename, mode, info.date_time), src.read(info))
    tmp.replace(dst)
    return dst.stat().st_size


def _member(
    name: str, mode: int, date_time: tuple[int, int, int, int, int, int] = (2024, 1, 1, 0, 0, 0)
) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=date_time)
    info.create_system = 3
    info.external_attr = (0o100000 | mode) << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def build(out: Path, packages: dict[str, tuple[list[str], bytes]] | None = None) -> list[Path]:
    """Build (or reuse) every package of ``packages`` (default :data:`PACKAGES`);
    return their paths."""
    corpus = out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (requirements, handler) in (PACKAGES if packages is None else packages).items():
        path = corpus / f"{name}.zip"
        if not path.exists():
            build_zip(download(requirements, out / "wheels" / name), handler, path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--start", action="store_true", help="the start corpus (bench/coldstart.py) instead"
    )
    args = parser.parse_args()
    for path in build(args.out, START_PACKAGES if args.start else None):
        print(f"{path}  {path.stat().st_size / 2**20:7.2f} MiB")


if __name__ == "__main__":
    main()
