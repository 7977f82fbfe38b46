"""Typed errors of the device runtime.

The client maps each to a fallback reason (server trouble) or lets it reach the caller (bad input);
the CLI maps them to exit status 2 with one clear line.
"""

from __future__ import annotations


class CoinferError(Exception):
    """Base class of everything ue_client raises on purpose."""


class InputError(CoinferError, ValueError):
    """Bad input from the user: unknown model, unreadable input file, wrong shape or dtype, bad option.

    Also a ``ValueError``, so library callers can catch bad values the usual way."""


class ServerError(CoinferError):
    """The server could not serve a request; the client falls back to local execution."""

    reason = "server error"
    kind = "server error"
    """The fallback category reports give (``RequestReport.fallback_kind``): unreachable, server error,
    deadline, protocol error (planner failure is the client's own, without a ServerError)."""
    code = ""
    """The gRPC status name, when the server (or the transport) gave one."""


class ServerUnavailable(ServerError):
    """The server cannot be reached (connect failed, stream broke, server shut down)."""

    reason = "server unavailable"
    kind = "unreachable"


class RequestFailed(ServerError):
    """The server answered RequestFailed (or refused the slice) for one request; the session stays usable."""

    reason = "request failed on server"

    def __init__(self, message: str, code: str = "INTERNAL", server_message: str = ""):
        super().__init__(message)
        self.code = code
        """The gRPC status NAME the server gave, e.g. "INVALID_ARGUMENT" (``protos.values.StatusName``)."""
        self.server_message = server_message
        """A failed request's message as the server sent it ('' where the failure was not a request's answer)."""


class DeadlineExceeded(ServerError):
    """The server's answer did not arrive before the request's deadline."""

    reason = "deadline exceeded"
    kind = "deadline"


class ProtocolError(ServerError):
    """The server sent something this client does not understand (wrong order, bad chunk, bad metadata)."""

    reason = "protocol error"
    kind = "protocol error"


class AccessDenied(CoinferError):
    """The server refused the caller (UNAUTHENTICATED: no/unknown token; PERMISSION_DENIED: not this
    tenant's). The user's error, not a server failure: never a reason to fall back to local execution."""

    def __init__(self, message: str, code: str = "UNAUTHENTICATED"):
        super().__init__(message)
        self.code = code
        """The gRPC status NAME."""
