"""Byte format of the data channel: a side TCP connection that carries one session's weight bytes.

The gRPC Session stream stays the control path (slices, requests, cut tensors, acknowledgements); weight
bytes may instead go on a plain (or TLS) TCP connection to ``Limits.data_port``, raw from the UE's tensor
memory, so that neither side copies them into protobuf messages or grpcio slices (issue 12: grpcio's
``grpc_slice_from_copied_buffer`` alone kept the in-stream upload above 2x a socket's CPU floor).
Both runtimes read this one definition (``ue_client.data_channel`` sends, ``edge_server.data_channel``
receives); no grpc, protobuf or torch here. All integers are little-endian.

1. The UE opens the connection (TLS when the gRPC endpoint is TLS) and sends a **hello**
   (:data:`HELLO`, 40 bytes: magic ``CFDC``, version 1, the length of the session id, 2 zero bytes, the
   32-byte ticket of ``SessionOpened.data_ticket``) followed by the session id (UTF-8, at most
   :data:`MAX_SESSION_ID` bytes).
2. The server answers one byte: :data:`ACCEPTED`, or :data:`REFUSED` and closes.
3. The UE then sends **frames**, each a :data:`FRAME` header (208 bytes: magic ``CFW1``, the weight's
   raw sha256, its dtype name NUL-padded to 16 bytes, ndim, 3 zero bytes, offset, size and total bytes
   of the weight, 16 dimensions of which the first ndim are the shape and the rest 0) followed by
   ``size`` raw bytes: the weight's bytes [offset, offset + size). The frames of one weight come in
   order; frames of different weights may interleave (a weight's upload pauses while a more urgent one
   goes), exactly as ``WeightChunk`` messages on the stream. The server acknowledges each weight it
   committed on the Session stream (``weights_stored``), never on this connection.

The UE closes the connection (or the session ends) to finish; an error closes it from the server's side.
"""

from __future__ import annotations

import struct

MAGIC_HELLO = b"CFDC"
MAGIC_FRAME = b"CFW1"
VERSION = 1
TICKET_BYTES = 32
MAX_SESSION_ID = 64
"""Longest session id a hello may carry (the server's ids are 32 hex characters)."""
MAX_NDIM = 16
DTYPE_FIELD = 16

HELLO = struct.Struct("<4sBBxx32s")
FRAME = struct.Struct(f"<4s32s{DTYPE_FIELD}sB3xQQQ{MAX_NDIM}Q")
ACCEPTED = b"\x00"
REFUSED = b"\x01"


class FrameError(ValueError):
    """A hello or frame header that does not follow this format (wrong magic, version, field)."""


def encode_hello(ticket: bytes, session_id: str) -> bytes:
    """The hello of a connection for ``session_id`` with its ``ticket``. Raises FrameError if either does
    not fit the format."""
    sid = session_id.encode()
    if len(ticket) != TICKET_BYTES or len(sid) > MAX_SESSION_ID:
        raise FrameError(f"ticket must be {TICKET_BYTES} bytes and the session id at most {MAX_SESSION_ID}")
    return HELLO.pack(MAGIC_HELLO, VERSION, len(sid), ticket) + sid


def decode_hello(head: bytes) -> tuple[bytes, int]:
    """(ticket, length of the session id that follows) of a hello's first :data:`HELLO`.size bytes.
    Raises FrameError for another magic or version, or an oversized session id."""
    magic, version, sid_len, ticket = HELLO.unpack(head)
    if magic != MAGIC_HELLO or version != VERSION:
        raise FrameError(f"not a coinfer data channel hello (magic {magic!r}, version {version})")
    if sid_len > MAX_SESSION_ID:
        raise FrameError(f"session id of {sid_len} bytes (> {MAX_SESSION_ID})")
    return ticket, sid_len


def encode_frame(sha256_hex: str, dtype: str, shape: tuple[int, ...], offset: int, size: int, total: int) -> bytes:
    """The header of a frame carrying ``size`` bytes at ``offset`` of a weight of ``total`` bytes.
    Raises FrameError for a shape of more than :data:`MAX_NDIM` dims or an overlong dtype name."""
    name = dtype.removeprefix("torch.").encode()
    if len(shape) > MAX_NDIM or len(name) > DTYPE_FIELD:
        raise FrameError(f"weight {sha256_hex[:12]}: {len(shape)} dims or dtype {dtype!r} do not fit a frame")
    dims = tuple(shape) + (0,) * (MAX_NDIM - len(shape))
    return FRAME.pack(MAGIC_FRAME, bytes.fromhex(sha256_hex), name, len(shape), offset, size, total, *dims)


def decode_frame(head: bytes) -> tuple[str, str, tuple[int, ...], int, int, int]:
    """(sha256 hex, dtype name, shape, offset, size, total bytes) of a frame header. Only the layout is
    checked here (magic, ndim, padding, ASCII); the receiver validates the values as it validates a
    ``WeightChunk`` (``edge_server.tensor_codec.check_weight_span``). Raises FrameError."""
    magic, sha, name, ndim, offset, size, total, *dims = FRAME.unpack(head)
    if magic != MAGIC_FRAME:
        raise FrameError(f"bad frame magic {magic!r}: the stream is out of step")
    if ndim > MAX_NDIM or any(dims[ndim:]):
        raise FrameError(f"frame with ndim {ndim} and dimensions {dims}")
    dtype = name.rstrip(b"\0")
    if not dtype.isascii() or b"\0" in dtype:
        raise FrameError("frame dtype is not a NUL-padded ASCII name")
    return sha.hex(), dtype.decode(), tuple(dims[:ndim]), offset, size, total
