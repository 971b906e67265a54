"""The error tree: one class per error code of the contract.

::

    CachesvcError                      (500 internal)
    ├── InvalidRequest                 400 invalid_request
    │   ├── InvalidDigest              400 invalid_digest
    │   ├── MethodNotAllowed           405 invalid_request (with Allow)
    │   └── VersionNotSupported        505 invalid_request (then the connection closes)
    ├── Unauthorized                   401 unauthorized
    ├── NotFound                       404 not_found
    │   └── UnknownTenant              404 unknown_tenant
    ├── NotHere                        404 not_here (fan-out: this host neither holds nor fills it)
    ├── LoopRefused                    409 loop (fan-out: the requester feeds this host)
    ├── TooLarge                       413 too_large
    ├── RangeNotSatisfiable            416 range_not_satisfiable
    ├── UnsafeArchive                  422 unsafe_archive
    ├── UnsupportedFormat              422 unsupported_format
    ├── UpstreamError                  502 upstream_error
    │   ├── DigestMismatch             502 digest_mismatch
    │   └── PeerFailed                 502 upstream_error (one peer; the walk moves on)
    ├── Overloaded                     503 overloaded
    ├── FanoutBusy                     503 fanout_busy (fan-out: this host feeds K hosts already)
    └── UpstreamTimeout                504 upstream_timeout

    ConfigError                        not a request error: a service cannot start

Every class carries ``status`` and ``code``; knows nothing of HTTP
(:mod:`cachesvc.serve.http` turns them into JSON).
"""

from __future__ import annotations


class CachesvcError(Exception):
    """Base of every error a client may see. ``headers`` go on the response."""

    status = 500
    code = "internal"
    headers: dict[str, str] = {}  # noqa: RUF012 (replaced per instance, never mutated)


class InvalidRequest(CachesvcError):
    status = 400
    code = "invalid_request"


class InvalidDigest(InvalidRequest):
    code = "invalid_digest"


class MethodNotAllowed(InvalidRequest):
    """The path names a resource that does not take this method (RFC 9110 §15.5.6:
    a 405 carries ``Allow``)."""

    status = 405

    def __init__(self, method: str, allowed: list[str]) -> None:
        super().__init__(f"method {method} not allowed; use {', '.join(allowed)}")
        self.headers = {"Allow": ", ".join(allowed)}


class VersionNotSupported(InvalidRequest):
    """A request in an HTTP version other than 1.0 and 1.1 (RFC 9110 §15.6.6).
    The answer closes the connection: its framing is not one we speak."""

    status = 505

    def __init__(self, version: str) -> None:
        super().__init__(f"HTTP/{version} is not supported: use HTTP/1.1 (or 1.0)")
        self.headers = {"Connection": "close"}


class Unauthorized(CachesvcError):
    status = 401
    code = "unauthorized"


class NotFound(CachesvcError):
    status = 404
    code = "not_found"


class UnknownTenant(NotFound):
    code = "unknown_tenant"


class NotHere(CachesvcError):
    """Asked by another host for a package this host neither holds nor is
    filling. Not authoritative, unlike :class:`NotFound`: ask elsewhere."""

    status = 404
    code = "not_here"


class LoopRefused(CachesvcError):
    """The requesting host is one this host is itself fetching the package
    through: serving it would make each wait for the other."""

    status = 409
    code = "loop"


class TooLarge(CachesvcError):
    status = 413
    code = "too_large"


class RangeNotSatisfiable(CachesvcError):
    status = 416
    code = "range_not_satisfiable"

    def __init__(self, detail: str, size: int) -> None:
        super().__init__(detail)
        self.headers = {"Content-Range": f"bytes */{size}"}  # RFC 9110 §15.5.17


class UnsafeArchive(CachesvcError):
    status = 422
    code = "unsafe_archive"


class UnsupportedFormat(CachesvcError):
    status = 422
    code = "unsupported_format"


class UpstreamError(CachesvcError):
    status = 502
    code = "upstream_error"


class DigestMismatch(UpstreamError):
    code = "digest_mismatch"


class PeerFailed(UpstreamError):
    """One peer failed this request (down, slow, wrong bytes); try the next source."""


class Overloaded(CachesvcError):
    status = 503
    code = "overloaded"

    def __init__(self, detail: str, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.headers = {"Retry-After": str(retry_after)}


class FanoutBusy(CachesvcError):
    """This host already feeds ``--fanout`` hosts this package; ask elsewhere."""

    status = 503
    code = "fanout_busy"


class UpstreamTimeout(CachesvcError):
    status = 504
    code = "upstream_timeout"


class ConfigError(Exception):
    """A service cannot start as configured: a bad flag or ``CACHESVC_*`` value,
    a cache or code dir that cannot be used, a dir locked by another process.

    The message is one line that names its source (the flag or variable, or the
    path); the command prints it as ``cachesvc: <message>`` and exits 2, with no
    traceback. Never a response to a request.
    """
