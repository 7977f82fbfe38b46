"""Typed domain errors of the edge server.

Domain code raises these; only the servicer (``edge_server.servicer``) maps them to gRPC status codes,
so nothing below the boundary imports grpc.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Base class. ``code`` is the name of the grpc.StatusCode the servicer answers with."""

    code = "INTERNAL"


class InvalidArgument(EdgeError):
    """Bad input from the client: malformed, inconsistent, oversized, failing its hash, not allowed."""

    code = "INVALID_ARGUMENT"


class NotFound(EdgeError):
    """An id the client referred to (session, slice, request) does not exist."""

    code = "NOT_FOUND"


class ResourceExhausted(EdgeError):
    """Over a limit: cache, staging area, sessions."""

    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(EdgeError):
    """The call is valid but the server is not in a state to do it (e.g. a request before its slice)."""

    code = "FAILED_PRECONDITION"


class PermissionDenied(EdgeError):
    """The caller may not do this (e.g. pin a session of another tenant)."""

    code = "PERMISSION_DENIED"


class Unauthenticated(EdgeError):
    """The call carries no valid credentials (normally refused earlier, by the auth interceptor)."""

    code = "UNAUTHENTICATED"


class DeadlineExceeded(EdgeError):
    """Too long without progress (e.g. a session idle past ``--session-idle-s``)."""

    code = "DEADLINE_EXCEEDED"


class Unavailable(EdgeError):
    """The server cannot take the call now for a reason that passes (its reading slots held by other callers):
    retry with a backoff (gRPC's UNAVAILABLE: "a transient condition, which can be corrected by retrying")."""

    code = "UNAVAILABLE"
