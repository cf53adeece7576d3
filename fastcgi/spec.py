"""Numbers from the FastCGI 1.0 specification (fastcgi-archives.github.io/FastCGI_Specification)."""

from __future__ import annotations

import enum

VERSION_1 = 1

#: Request id 0 is reserved for management records (GET_VALUES and its result).
NULL_REQUEST_ID = 0

#: Every record starts with this many header bytes.
HEADER_LEN = 8

#: The content length field is 16 bits wide.
MAX_CONTENT_LEN = 0xFFFF

#: BEGIN_REQUEST flag: keep the connection open after END_REQUEST.
KEEP_CONN = 1


class RecordType(enum.IntEnum):
    BEGIN_REQUEST = 1
    ABORT_REQUEST = 2
    END_REQUEST = 3
    PARAMS = 4
    STDIN = 5
    STDOUT = 6
    STDERR = 7
    DATA = 8
    GET_VALUES = 9
    GET_VALUES_RESULT = 10
    UNKNOWN_TYPE = 11


class Role(enum.IntEnum):
    RESPONDER = 1
    AUTHORIZER = 2
    FILTER = 3


class ProtocolStatus(enum.IntEnum):
    REQUEST_COMPLETE = 0
    CANT_MPX_CONN = 1
    OVERLOADED = 2
    UNKNOWN_ROLE = 3


#: Management variable names a client may ask for with GET_VALUES.
MAX_CONNS = b"FCGI_MAX_CONNS"
MAX_REQS = b"FCGI_MAX_REQS"
MPXS_CONNS = b"FCGI_MPXS_CONNS"
