"""``busgate curl JOB_ID``: a shell command that makes one delivery of a stored job again.

FastCGI topics get ``cgi-fcgi`` (Debian: libfcgi-bin) under ``env -i``, because cgi-fcgi
sends its whole environment as the CGI parameters; the shell finds it on its ``PATH`` first,
which ``env -i`` would not.  HTTP topics get ``curl``, told to read no ``~/.curlrc`` (``-q``),
use no proxy from the environment and speak HTTP/1.1 even where TLS offers HTTP/2: the daemon
does neither of the first two, and only the last.  Either way the
payload travels base64-encoded inside the command and is decoded on the way into the tool's
stdin, so arbitrary bytes (NUL, CR LF, quotes, no trailing newline) arrive byte for byte and
the command survives copy and paste.

The parameters and headers come from the delivery adapters themselves
(``FastCGIBackend.params``/``body``, ``HTTPBackend.request``), built from the topic by the
daemon's own ``build_backend``, so the command sends what the daemon sends.  Two things differ
by nature: ``traceparent`` carries the job's trace id with a fresh span id (every delivery
gets one), and the attempt number is the one the job's last delivery carried (see
``job_of``).
"""

from __future__ import annotations

import base64
import re
import shlex
from collections.abc import Sequence

from adapters.delivery.fastcgi import FastCGIBackend
from adapters.delivery.http import HTTPBackend
from adapters.storage.jobs import Job, JobRecord
from gateway.app import build_backend
from gateway.config import Config, TopicConfig

#: ``-q`` must come first.  ``-g``: brackets and braces in the URL are not curl globs.
#: ``--path-as-is``: curl would squash ``./`` and ``../`` that the daemon sends as written.
_CURL = "curl -q -sS -i -g --path-as-is --http1.1 --noproxy '*'"
#: Under ``env -i`` there is no PATH: cgi-fcgi in /usr/local/bin would not be found.
_CGI_FCGI = '"$(command -v cgi-fcgi || echo cgi-fcgi)"'

#: Pipeline stages start a continued line; a stage's arguments are indented below it.
_STAGE = " \\\n  "
_ARGUMENT = " \\\n      "

#: What the printed command may not hold raw: C0 controls, DEL and C1 controls (U+009B is an
#: 8-bit CSI to a terminal), which a producer's attribute can carry.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class ReproduceError(Exception):
    """The command cannot be built (the message says why, for an operator)."""


def job_of(record: JobRecord) -> Job:
    """The job as a delivery would carry it.

    ``X-Busgate-Attempt`` is the number of the job's last delivery (``record.attempt``: for a
    done or dead job the attempt that finished it, for a leased job the one in flight), so the
    backend sees what it saw then and code that branches on the attempt behaves the same.
    A job never delivered yet (attempt 0, or replayed from the dead letters) gets 1, the
    number its first delivery will carry.
    """
    return Job(
        id=record.id,
        queue=record.queue,
        topic=record.topic,
        payload=record.payload,
        attributes=record.attributes,
        priority=record.priority,
        attempt=max(record.attempt, 1),
        enqueued_at=record.enqueued_at,
        run_at=record.run_at,
        trace_id=record.trace_id,
    )


def choose_copy(job_id: str, records: Sequence[JobRecord], topic: str | None) -> JobRecord:
    """The topic copy to reproduce; ``topic`` is ``NAME`` or ``QUEUE/NAME``."""
    if not records:
        raise ReproduceError(
            f"no job {job_id!r} in the store (unknown id, or pruned from the history)"
        )
    names = ", ".join(f"{r.queue}/{r.topic}" for r in records)
    candidates = list(records)
    if topic is not None:
        queue, slash, name = topic.rpartition("/")
        candidates = [r for r in records if r.topic == name and (not slash or r.queue == queue)]
        if not candidates:
            raise ReproduceError(f"job {job_id!r} has no copy for topic {topic!r}; it has: {names}")
    if len(candidates) > 1:
        listed = ", ".join(f"{r.queue}/{r.topic}" for r in candidates)
        raise ReproduceError(
            f"job {job_id!r} was copied to {len(candidates)} topics; pick one with --topic: "
            + listed
        )
    return candidates[0]


def topic_of(config: Config, record: JobRecord) -> TopicConfig:
    """The configured topic a stored copy belongs to."""
    queue = config.queue(record.queue)
    if queue is None:
        raise ReproduceError(
            f"job {record.id!r} belongs to queue {record.queue!r}, which is no longer configured"
        )
    topic = queue.topic(record.topic)
    if topic is None:
        raise ReproduceError(
            f"job {record.id!r} belongs to topic {record.topic!r} of queue {record.queue!r},"
            " which is no longer configured"
        )
    return topic


def reproduce_command(topic: TopicConfig, record: JobRecord) -> str:
    """A shell command that delivers ``record`` to ``topic``'s backend.

    bash or zsh; POSIX sh too unless a value holds control characters (see ``_quote``).
    """
    if topic.kind == "fastcgi":
        return fastcgi_command(topic, record)
    return http_command(topic, record)


def fastcgi_command(topic: TopicConfig, record: JobRecord) -> str:
    """``printf … | base64 -d | env -i NAME=value … cgi-fcgi -bind -connect ADDRESS``."""
    backend = build_backend(topic)
    assert isinstance(backend, FastCGIBackend)
    address = backend.target.address
    # cgi-fcgi splits -connect at the first colon: host:port, or else a unix socket path.
    if address.is_unix:
        if ":" in address.path:
            raise ReproduceError(f"cgi-fcgi cannot connect to a socket path with ':' ({address})")
        connect = address.path
    else:
        if ":" in address.host:
            raise ReproduceError(f"cgi-fcgi cannot connect to an IPv6 address ({address})")
        connect = f"{address.host}:{address.port}"
    job = job_of(record)
    body = backend.body(job)
    assignments = [_assignment(name, value) for name, value in backend.params(job, body)]
    run = _ARGUMENT.join(["env -i", *assignments, f"{_CGI_FCGI} -bind -connect {_quote(connect)}"])
    return _STAGE.join([*_payload_stages(body), f"| {run}"])


def http_command(topic: TopicConfig, record: JobRecord) -> str:
    """``printf … | base64 -d | curl -q … -X POST URL -H 'Name: value' … --data-binary @-``."""
    backend = build_backend(topic)
    assert isinstance(backend, HTTPBackend)
    headers, body = backend.request(job_of(record))
    options = [_CURL, "-X POST", _quote(backend.url)]
    if not topic.verify_tls:
        options.append("--insecure")
    if topic.ca_file is not None:
        # The daemon trusts that file only; curl would also trust its built-in CApath
        # (/etc/ssl/certs on Debian) unless given one where no certificate can be found.
        options.append(f"--cacert {_quote(topic.ca_file)} --capath /dev/null")
    header_options = [_header(name, value) for name, value in headers]
    # curl adds Accept, and Expect: 100-continue to large bodies; the daemon sends neither.
    header_options += ["-H 'Accept:'", "-H 'Expect:'"]
    run = _ARGUMENT.join([" ".join(options), *header_options, "--data-binary @-"])
    return _STAGE.join([*_payload_stages(body), f"| {run}"])


def _payload_stages(body: bytes) -> list[str]:
    encoded = base64.b64encode(body).decode("ascii")
    return [f"printf '%s' {shlex.quote(encoded)}", "| base64 -d"]


def _assignment(name: bytes, value: bytes) -> str:
    if b"=" in name or b"\0" in name + value:
        raise ReproduceError(
            f"the CGI parameter {name!r} cannot be set through an environment (it holds '=' or NUL)"
        )
    # The adapter encodes every parameter from text as UTF-8, so decoding cannot fail.
    return f"{_quote(name.decode())}={_quote(value.decode())}"


def _header(name: str, value: str) -> str:
    # `-H 'Name:'` would remove the header; `-H 'Name;'` sends it with an empty value.
    line = f"{name}: {value}" if value else f"{name};"
    return f"-H {_quote(line)}"


def _quote(text: str) -> str:
    """``text`` as one shell word that puts no control character on the terminal.

    Plain text is single-quoted (POSIX).  Text with control characters becomes bash/zsh
    ``$'...'`` with those characters as ``\\xHH`` escapes of their UTF-8 bytes, which the
    shell turns back into the same bytes whatever its locale.
    """
    if not _CONTROL.search(text):
        return shlex.quote(text)
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    return "$'" + _CONTROL.sub(_escape, escaped) + "'"


def _escape(match: re.Match[str]) -> str:
    return "".join(f"\\x{byte:02x}" for byte in match.group().encode())
