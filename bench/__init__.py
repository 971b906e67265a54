"""Benchmark scripts (run as files: ``python bench/<name>.py``) and their shared helpers.

A package so that the scripts' ``from bench import ...`` and mypy name each
file once (``bench.procs``, not also ``procs``). Not installed.
"""
