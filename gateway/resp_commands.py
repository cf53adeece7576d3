"""What COMMAND says of busgate's commands: each described as Redis 7 describes its own.

Cluster-aware clients (redis-py's ``RedisCluster``, go-redis, Lettuce) read ``COMMAND`` to
learn which argument of a command is its key, and tools list ``COMMAND LIST`` or count
``COMMAND COUNT``.  So every command busgate answers is described here with the flags, key
position and ACL categories Redis 7 gives the command of the same name (the push commands'
key is the queue they push to), and nothing busgate does not answer is listed.  A
subcommand is described with its own name (``client|list``) and arity, and its container's
flags and categories.

``COMMAND DOCS`` answers an empty map: redis-cli reads it only to offer argument hints, and
busgate's commands take Redis's arguments with other meanings (a payload, not a list
element), which hints of its own would have to say at length.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from gateway import resp


@dataclass(frozen=True, slots=True)
class Described:
    """A command as COMMAND INFO describes it (Redis 7's fields, in its order)."""

    name: str  # lower case, as Redis lists it; ``container|sub`` for a subcommand
    arity: int
    flags: tuple[str, ...]
    categories: tuple[str, ...]  # ACL categories, with their @
    #: The access flags of its key, the first argument, as COMMAND GETKEYSANDFLAGS gives
    #: them; () for a command without one.
    key: tuple[str, ...] = ()
    subcommands: tuple[Described, ...] = ()

    def reply(self, protocol: int) -> bytes:
        """COMMAND INFO's entry: name, arity, flags, first key, last key, key step, ACL
        categories, tips, key specifications, subcommands."""
        first = 1 if self.key else 0
        return resp.array(
            [
                resp.bulk_string(self.name.encode()),
                resp.integer(self.arity),
                flags(self.flags, protocol),
                resp.integer(first),
                resp.integer(first),
                resp.integer(first),
                flags(self.categories, protocol),
                unordered([], protocol),  # no tips: no request or response policy across shards
                unordered([self._key_spec(protocol)] if self.key else [], protocol),
                # An array when there are some, an empty set when none: as Redis 7 sends it.
                resp.array([sub.reply(protocol) for sub in self.subcommands])
                if self.subcommands
                else unordered([], protocol),
            ]
        )

    def _key_spec(self, protocol: int) -> bytes:
        # The key is the argument at index 1, alone: Redis's spec for LPUSH's key.
        return resp.mapping(
            [
                (resp.bulk_string(b"flags"), flags(self.key, protocol)),
                (
                    resp.bulk_string(b"begin_search"),
                    resp.mapping(
                        [
                            (resp.bulk_string(b"type"), resp.bulk_string(b"index")),
                            (
                                resp.bulk_string(b"spec"),
                                resp.mapping(
                                    [(resp.bulk_string(b"index"), resp.integer(1))], protocol
                                ),
                            ),
                        ],
                        protocol,
                    ),
                ),
                (
                    resp.bulk_string(b"find_keys"),
                    resp.mapping(
                        [
                            (resp.bulk_string(b"type"), resp.bulk_string(b"range")),
                            (
                                resp.bulk_string(b"spec"),
                                resp.mapping(
                                    [
                                        (resp.bulk_string(b"lastkey"), resp.integer(0)),
                                        (resp.bulk_string(b"keystep"), resp.integer(1)),
                                        (resp.bulk_string(b"limit"), resp.integer(0)),
                                    ],
                                    protocol,
                                ),
                            ),
                        ],
                        protocol,
                    ),
                ),
            ],
            protocol,
        )


def unordered(items: Sequence[bytes], protocol: int) -> bytes:
    """Already-encoded replies as a set under RESP3, as Redis sends most of COMMAND INFO's
    lists; an array under RESP2."""
    return b"~%d\r\n" % len(items) + b"".join(items) if protocol == 3 else resp.array(items)


def flags(items: Sequence[str], protocol: int) -> bytes:
    """Flags or categories, as status replies in a set (RESP3) or an array (RESP2)."""
    return unordered([resp.simple_string(item) for item in items], protocol)


_FAST_WRITE = ("write", "denyoom", "fast")
_SESSION = ("noscript", "loading", "stale", "fast", "no_auth", "allow_busy")
_TRANSACTION = ("noscript", "loading", "stale", "fast", "allow_busy")

#: Each command's flags, ACL categories and key access flags, from Redis 7's own table.
_TRAITS: dict[bytes, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    b"AUTH": (_SESSION, ("@fast", "@connection"), ()),
    b"LPUSH": (_FAST_WRITE, ("@write", "@list", "@fast"), ("RW", "insert")),
    b"RPUSH": (_FAST_WRITE, ("@write", "@list", "@fast"), ("RW", "insert")),
    b"ZADD": (_FAST_WRITE, ("@write", "@sortedset", "@fast"), ("RW", "update")),
    b"XADD": (_FAST_WRITE, ("@write", "@stream", "@fast"), ("RW", "update")),
    b"LLEN": (("readonly", "fast"), ("@read", "@list", "@fast"), ("RO",)),
    b"PING": (("fast",), ("@fast", "@connection"), ()),
    b"ECHO": (("loading", "stale", "fast"), ("@fast", "@connection"), ()),
    b"QUIT": (_SESSION, ("@fast", "@connection"), ()),
    b"SELECT": (("loading", "stale", "fast"), ("@fast", "@connection"), ()),
    b"CLIENT": ((), ("@slow",), ()),
    b"HELLO": (_SESSION, ("@fast", "@connection"), ()),
    b"COMMAND": (("loading", "stale"), ("@slow", "@connection"), ()),
    b"CONFIG": ((), ("@slow",), ()),
    b"MULTI": (_TRANSACTION, ("@fast", "@transaction"), ()),
    b"EXEC": (("noscript", "loading", "stale", "skip_slowlog"), ("@slow", "@transaction"), ()),
    b"DISCARD": (_TRANSACTION, ("@fast", "@transaction"), ()),
    b"INFO": (("loading", "stale"), ("@slow", "@dangerous"), ()),
    b"RESET": (_SESSION, ("@fast", "@connection"), ()),
}


def describe(name: bytes, arity: int, subcommands: Mapping[bytes, int] | None = None) -> Described:
    """How COMMAND INFO describes the command ``name`` (upper case, as the table has it)."""
    flags, categories, key = _TRAITS[name]
    lower = name.decode().lower()
    return Described(
        lower,
        arity,
        flags,
        categories,
        key,
        tuple(
            Described(f"{lower}|{sub.decode().lower()}", sub_arity, flags, categories)
            for sub, sub_arity in (subcommands or {}).items()
        ),
    )


def find(described: Mapping[bytes, Described], name: bytes) -> Described | None:
    """The command COMMAND INFO names, in any case: ``lpush``, or a subcommand as
    ``client|list``."""
    container, bar, _sub = name.upper().partition(b"|")
    found = described.get(container)
    if found is None or not bar:
        return found
    wanted = name.decode("utf-8", "replace").lower()
    return next((sub for sub in found.subcommands if sub.name == wanted), None)


def listed(commands: Iterable[Described], filters: Sequence[bytes]) -> list[bytes]:
    """COMMAND LIST [FILTERBY MODULE name | ACLCAT category | PATTERN pattern]: the names,
    subcommands included, as Redis lists them.  Raises ValueError for a malformed filter."""
    names = [d for command in commands for d in (command, *command.subcommands)]
    if not filters:
        return [d.name.encode() for d in names]
    if len(filters) != 3 or filters[0].upper() != b"FILTERBY":
        raise ValueError("syntax error")
    kind, value = filters[1].upper(), filters[2].decode("utf-8", "replace").lower()
    if kind == b"MODULE":
        return []  # busgate loads no modules
    if kind == b"ACLCAT":
        return [d.name.encode() for d in names if f"@{value}" in d.categories]
    if kind == b"PATTERN":  # Redis matches without regard to case
        return [d.name.encode() for d in names if fnmatch.fnmatchcase(d.name, value)]
    raise ValueError("syntax error")


HELP = (
    "COMMAND <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    "(no subcommand)",
    "    Return details about all busgate commands.",
    "COUNT",
    "    Return the total number of commands in this busgate server.",
    "LIST [FILTERBY (MODULE <module-name>|ACLCAT <category>|PATTERN <pattern>)]",
    "    Return a list of all commands in this busgate server.",
    "INFO [<command-name> ...]",
    "    Return details about multiple busgate commands.",
    "    If no command names are given, details for all commands are returned.",
    "DOCS [<command-name> ...]",
    "    Return documentation details about busgate commands: none are kept.",
    "GETKEYS <full-command>",
    "    Return the keys from a full busgate command.",
    "GETKEYSANDFLAGS <full-command>",
    "    Return the keys and the access flags from a full busgate command.",
    "HELP",
    "    Print this help.",
)
