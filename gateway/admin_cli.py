"""Operator commands against a running daemon, over its admin API and producer HTTP API.

busgate stats                                   every topic: depths, rates, p95, circuit, paused
busgate jobs show ID                            every topic copy of a job with its attempts
busgate dead list QUEUE/TOPIC [filters]         dead jobs, newest first
busgate dead replay QUEUE/TOPIC (--ids … | filters | --all) [--rate N]
busgate dead delete QUEUE/TOPIC (--ids … | filters | --all)
                                                list and delete work for a topic removed
                                                from conf.d too; replay needs it configured
busgate pause QUEUE/TOPIC, busgate resume QUEUE/TOPIC
busgate push QUEUE[/TOPIC] PAYLOAD              prints the job id; PAYLOAD - reads stdin

Each finds the daemon through ``-c busgate.yaml`` (``listen.http``, ``admin_token_file``) or
``--url``/``--token-file``/``$BUSGATE_ADMIN_TOKEN``.  ``--json`` prints the server's JSON.
Exit status: 0 done, 1 the server or the connection failed, 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TextIO

from gateway.admin_client import (
    MAX_PAGE,
    PASSWORD_ENV,
    TOKEN_ENV,
    AdminClient,
    BadRequest,
    ClientError,
    NotFound,
    Selection,
    Settings,
    SetupError,
    chunked,
)
from gateway.config import DEFAULT_CONFIG, ConfigError
from gateway.units import parse_duration

#: Dead jobs `dead list` shows unless told otherwise (the server's default page).
DEFAULT_LIMIT = 50
#: Ids per replay call when the rate does not ask for smaller steps.
REPLAY_CHUNK = 100
BAR_WIDTH = 30
#: Off a terminal, a replay's progress is a line this often.
PROGRESS_LINE_INTERVAL = 10.0
_UNIX_SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?")
#: What a producer's text may hold that must not reach the operator's terminal as it is:
#: control characters (C0, DEL, C1: ESC starts sequences that retitle or clear the terminal,
#: or worse) and lone surrogates (JSON's "\ud800", in a job stored before pushes refused
#: them: print cannot encode them); and the backslash, so that a producer's text "\x1b"
#: does not print as ESC does.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff\\]")
#: What JSON leaves as it is of those: C0 and the backslash it escapes itself.
_JSON_UNPRINTABLE = re.compile(r"[\x7f-\x9f\ud800-\udfff]")
_SHORT_ESCAPES = {"\r": "\\r", "\n": "\\n", "\t": "\\t", "\\": "\\\\"}

Handler = Callable[[argparse.Namespace], int]
Command = Callable[[argparse.Namespace, Settings], int]


class UsageError(ClientError):
    """The command line asks for something that cannot work (exit status 2)."""


def add_admin_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the operator commands on ``busgate``'s subcommand parser."""
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "-c",
        "--config",
        metavar="CONFIG",
        help=f"busgate.yaml: where the daemon listens, its admin token (default {DEFAULT_CONFIG})",
    )
    where.add_argument(
        "--url", help="the daemon's address, e.g. http://127.0.0.1:12019 (default: listen.http)"
    )
    where.add_argument("--json", action="store_true", help="print the server's JSON")
    admin = argparse.ArgumentParser(add_help=False, parents=[where])
    admin.add_argument(
        "--token-file",
        metavar="PATH",
        help=f"the admin token (default: ${TOKEN_ENV}, then the config's admin_token_file)",
    )
    filters = argparse.ArgumentParser(add_help=False)
    group = filters.add_argument_group("filters")
    group.add_argument("--status", type=int, metavar="N", help="the last attempt's HTTP status")
    group.add_argument("--error", metavar="TEXT", help="text in the error, any case")
    group.add_argument(
        "--since", metavar="T", help="died at or after T: unix seconds, ISO-8601, or 1h (ago)"
    )
    group.add_argument("--until", metavar="T", help="died before T (same forms as --since)")
    group.add_argument(
        "--attribute", metavar="NAME:VALUE", help="an attribute's value (a ':' in NAME as \\:)"
    )
    selection = argparse.ArgumentParser(add_help=False, parents=[filters])
    selection.add_argument(
        "--ids", nargs="+", metavar="ID", help="these dead jobs (after QUEUE/TOPIC)"
    )
    selection.add_argument("--all", action="store_true", help="every dead job of the topic")
    selection.add_argument("--dry-run", action="store_true", help="count the matches only")
    selection.add_argument(
        "-y", "--yes", action="store_true", help="do not ask (required when stdin is no terminal)"
    )

    stats = commands.add_parser("stats", parents=[admin], help="every topic's depths and rates")
    stats.set_defaults(handler=_handler(_stats))

    jobs = commands.add_parser("jobs", help="look up jobs")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True, metavar="show")
    show = jobs_commands.add_parser(
        "show", parents=[admin], help="every topic copy of a job, with its attempts"
    )
    show.add_argument("job_id", metavar="ID")
    show.set_defaults(handler=_handler(_jobs_show))

    dead = commands.add_parser("dead", help="dead jobs: list, replay, delete")
    dead_commands = dead.add_subparsers(
        dest="dead_command", required=True, metavar="{list,replay,delete}"
    )
    listing = dead_commands.add_parser(
        "list",
        parents=[admin, filters],
        help="dead jobs of a topic, newest first (of a topic removed from conf.d too)",
    )
    listing.add_argument("target", metavar="QUEUE/TOPIC")
    listing.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help=f"show at most N (default {DEFAULT_LIMIT}); with --all-pages, the page size",
    )
    listing.add_argument("--cursor", help="continue where a previous listing stopped")
    listing.add_argument("--all-pages", action="store_true", help="every matching dead job")
    listing.add_argument(
        "--full-payloads",
        action="store_true",
        help="whole payloads (an export with --json); by default each is cut to its first KiB",
    )
    listing.set_defaults(handler=_handler(_dead_list))

    replay = dead_commands.add_parser(
        "replay",
        parents=[admin, selection],
        help="deliver dead jobs again, with fresh attempts (the topic must be configured)",
    )
    replay.add_argument("target", metavar="QUEUE/TOPIC")
    replay.add_argument("--rate", type=_positive, metavar="N", help="at most N jobs per second")
    replay.set_defaults(handler=_handler(_dead_replay))

    delete = dead_commands.add_parser(
        "delete",
        parents=[admin, selection],
        help="forget dead jobs (of a topic removed from conf.d too)",
    )
    delete.add_argument("target", metavar="QUEUE/TOPIC")
    delete.set_defaults(handler=_handler(_dead_delete))

    for name, summary in (
        ("pause", "stop delivering a topic (pushes are still accepted)"),
        ("resume", "deliver a paused topic again"),
    ):
        command = commands.add_parser(name, parents=[admin], help=summary)
        command.add_argument("target", metavar="QUEUE/TOPIC")
        command.set_defaults(handler=_handler(_pause if name == "pause" else _resume))

    push = commands.add_parser(
        "push", parents=[where], help="push a job through the producer HTTP API"
    )
    push.add_argument("target", metavar="QUEUE[/TOPIC]", help="a topic: that topic only")
    push.add_argument("payload", metavar="PAYLOAD", help="the payload; - reads bytes from stdin")
    push.add_argument("--id", dest="job_id", help="an explicit id (idempotency key)")
    push.add_argument("--delay-ms", type=int, metavar="N", help="deliver N ms from now")
    push.add_argument("--priority", choices=["high", "normal", "low"])
    push.add_argument(
        "--attr",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an attribute (repeatable)",
    )
    push.add_argument(
        "--password",
        help=f"the queue's password (default: ${PASSWORD_ENV}, then the queue's config)",
    )
    push.set_defaults(handler=_handler(_push))


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _handler(command: Command) -> Handler:
    """Run a command; map its failures to a ``busgate: …`` line and an exit status."""

    def handle(args: argparse.Namespace) -> int:
        settings = Settings(args.config, url=args.url, token_file=getattr(args, "token_file", None))
        try:
            return command(args, settings)
        except (SetupError, UsageError, BadRequest) as exc:
            return _fail(str(exc), 2)
        except ClientError as exc:
            return _fail(str(exc), 1)
        except ConfigError as exc:
            main = os.path.abspath(settings.config_path or DEFAULT_CONFIG)
            if os.path.abspath(exc.path) == main:
                hint = "or give --url and --token-file"
            else:  # a drop-in: only `push` reads them, for the queue's password
                hint = f"or give the queue's password with --password or ${PASSWORD_ENV}"
            return _fail(f"configuration error: {exc} ({hint})", 2)
        except BrokenPipeError:
            # The reader went away (| head): say nothing more, and let exit flush nowhere.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1

    return handle


def _fail(message: str, code: int) -> int:
    print(f"busgate: {message}", file=sys.stderr)
    return code


# -- reading ------------------------------------------------------------------------------------


def _stats(args: argparse.Namespace, settings: Settings) -> int:
    document = settings.admin_client().stats()
    if args.json:
        _print_json(document)
        return 0
    rows = []
    unconfigured = []  # removed by a reload with jobs left: the stats mark them
    unmatched = []  # per queue, repeated on each of its topics: read from the first
    for queue in document.get("queues", []):
        topics = queue.get("topics", [])
        if topics and topics[0]["totals"].get("unmatched"):
            unmatched.append(f"{topics[0]['totals']['unmatched']} pushed to {topics[0]['queue']}")
        for topic in topics:
            depth, rates = topic["depth"], topic["rates"]
            p95 = topic["duration_ms"]["p95"]
            configured = topic.get("configured", True)
            if not configured:
                unconfigured.append(f"{topic['queue']}/{topic['topic']}")
            rows.append(
                [
                    f"{topic['queue']}/{topic['topic']}",
                    str(depth["ready"]),
                    str(depth["delayed"]),
                    str(depth["leased"]),
                    str(depth["dead"]),
                    f"{rates['in_per_second']:.1f}",
                    f"{rates['out_per_second']:.1f}",
                    "-" if p95 is None else f"{p95:.1f}",
                    str(topic["totals"]["failed"]),
                    topic["circuit"]["state"] if configured else "-",
                    ("yes" if topic["paused"] else "no") if configured else "-",
                ]
            )
    store = document.get("store") or {"ok": True}
    if not store["ok"]:
        print(
            f"the store is not answering, since {_when(store['since'])}:"
            f" {_oneline(store['error'] or '', 300)}; the figures below are from"
            f" {_when(document.get('generated_at'))}"
        )
    if document.get("generated_at") is None:
        print("no stats yet: the daemon has not read its store; try again in a second")
    elif not rows:
        print("no topics configured")
    else:
        header = ["QUEUE/TOPIC", "READY", "DELAYED", "LEASED", "DEAD", "IN/S", "OUT/S"]
        header += ["P95 MS", "FAILED", "CIRCUIT", "PAUSED"]
        print(_table(header, rows, right=set(range(1, 9))))
        if unconfigured:
            print(
                f"not configured (removed by a reload?): {', '.join(unconfigured)};"
                " this daemon does not deliver their jobs (another sharing its Redis store may)"
            )
        if unmatched:
            print(
                f"matched no topic's filter, acknowledged and dropped: {', '.join(unmatched)}"
                " (totals.unmatched)"
            )
    return 0


def _jobs_show(args: argparse.Namespace, settings: Settings) -> int:
    document = settings.admin_client().job(args.job_id)
    if args.json:
        _print_json(document)
        return 0
    copies = document.get("copies", [])
    copies_text = _count(len(copies), "topic copy", "topic copies")
    print(f"job {document.get('id', args.job_id)}: {copies_text}")
    for copy in copies:
        print()
        print(
            f"{copy['queue']}/{copy['topic']}: {copy['state']}, attempt {copy['attempt']},"
            f" priority {copy['priority']}"
        )
        fields = [
            ("enqueued", _when(copy.get("enqueued_at"))),
            ("run at", _when(copy.get("run_at"))),
            ("finished", _when(copy.get("finished_at"))),
            ("trace", copy.get("trace_id") or "-"),
        ]
        attributes = copy.get("attributes") or {}
        if attributes:
            shown = " ".join(f"{_escaped(k)}={_escaped(v)}" for k, v in attributes.items())
            fields.append(("attributes", shown))
        fields.append(("payload", _payload(copy)))
        for name, value in fields:
            print(f"  {name:<11}{value}")
        attempts = copy.get("attempts") or []
        if not attempts:
            print("  no attempts yet")
            continue
        rows = [
            [
                str(a["attempt"]),
                _when(a.get("started_at")),
                a["outcome"],
                "-" if a.get("status") is None else str(a["status"]),
                f"{a['duration_ms']:.1f} ms",
                _oneline(a.get("error") or "", 80) or "-",
            ]
            for a in attempts
        ]
        header = ["ATTEMPT", "STARTED", "OUTCOME", "STATUS", "DURATION", "ERROR"]
        print(_table(header, rows, right={0, 3, 4}, indent="  "))
        for a in attempts:
            if a.get("stderr"):
                print(f"  attempt {a['attempt']} stderr: {_oneline(a['stderr'], 200)}")
    return 0


def _dead_list(args: argparse.Namespace, settings: Settings) -> int:
    queue, topic = _topic(args.target)
    where = _filter(args)
    if args.full_payloads:
        where["payload"] = "full"  # a query option beside the filter, as the server reads it
    client = settings.admin_client()
    if args.all_pages:
        jobs: list[dict[str, Any]] = []
        pages = client.dead_pages(
            queue, topic, where, cursor=args.cursor, limit=args.limit or MAX_PAGE
        )
        unconfigured: dict[str, Any] = {}
        for page in pages:
            jobs += page["jobs"]
            unconfigured = _unconfigured(page)
        document: dict[str, Any] = {"jobs": jobs, "cursor": None, **unconfigured}
    else:
        document = _dead_up_to(client, queue, topic, where, args.cursor, args.limit)
    _note_unconfigured(document, queue, topic)
    _note_cut_payloads(document["jobs"])
    if args.json:
        _print_json(document)
        return 0
    jobs = document["jobs"]
    if not jobs:
        print("no dead jobs match")
    else:
        rows = [
            [
                job["id"],
                _when(job.get("died_at")),
                str(job["attempt"]),
                "-" if job.get("status") is None else str(job["status"]),
                _oneline(job.get("error") or "", 50) or "-",
                _payload(job, 40),
            ]
            for job in jobs
        ]
        header = ["ID", "DIED", "ATTEMPTS", "STATUS", "ERROR", "PAYLOAD"]
        print(_table(header, rows, right={2, 3}))
    if document["cursor"]:
        print(
            f"busgate: more dead jobs: --cursor {document['cursor']} continues, --all-pages"
            " shows every one",
            file=sys.stderr,
        )
    return 0


def _dead_up_to(
    client: AdminClient,
    queue: str,
    topic: str,
    where: Mapping[str, Any],
    cursor: str | None,
    limit: int | None,
) -> dict[str, Any]:
    """Up to ``limit`` dead jobs, following cursors past the short pages a store may give."""
    wanted = DEFAULT_LIMIT if limit is None else limit
    jobs: list[dict[str, Any]] = []
    while True:
        # A limit below 1 goes to the server as given: it says what the valid range is.
        page = client.dead_page(
            queue, topic, where, cursor=cursor, limit=min(wanted - len(jobs), MAX_PAGE)
        )
        jobs += page["jobs"]
        cursor = page.get("cursor")
        if not cursor or len(jobs) >= wanted:
            return {"jobs": jobs, "cursor": cursor, **_unconfigured(page)}


def _note_cut_payloads(jobs: Sequence[Mapping[str, Any]]) -> None:
    """The server sends the first KiB of each payload: say when one was cut, and how to
    have it whole, so neither the table nor an export passes an excerpt off as the job."""
    cut = sum(1 for job in jobs if job.get("payload_truncated"))
    if cut:
        print(
            f"busgate: {_count(cut, 'payload')} cut to the first KiB (payload_truncated):"
            " --full-payloads lists them whole, `busgate jobs show ID --json` shows one",
            file=sys.stderr,
        )


def _unconfigured(answer: Mapping[str, Any]) -> dict[str, Any]:
    """``{"configured": false}`` when the server said so of the topic, else nothing."""
    return {"configured": False} if answer.get("configured") is False else {}


def _note_unconfigured(answer: Mapping[str, Any], queue: str, topic: str) -> None:
    """Say why a topic removed from the configuration still has dead jobs to show, and what
    cannot be done with them (the server refuses a replay with its own message)."""
    if _unconfigured(answer):
        print(
            f"busgate: {queue}/{topic} is not configured (removed by a reload?): its dead jobs"
            " can be listed and deleted, not replayed until the topic is added back",
            file=sys.stderr,
        )


# -- changing -----------------------------------------------------------------------------------


def _dead_replay(args: argparse.Namespace, settings: Settings) -> int:
    queue, topic = _topic(args.target)
    selection = _selection(args)
    client = settings.admin_client()
    counted = client.replay(queue, topic, selection, dry_run=True)
    if args.dry_run:
        return _dry_run(args, counted, f"{queue}/{topic}", "replayed")
    if counted["matched"] == 0:
        raise ClientError("no dead job matches that filter")
    # An id given twice is one job: counted once, not reported as "no longer dead".  A
    # filter's ids are collected before asking: what is replayed is what the question
    # counted, not also what failed while the operator read it.
    ids = list(dict.fromkeys(selection.ids)) or _matching_ids(client, queue, topic, selection)
    if not ids:
        raise ClientError("no dead job matches any more: nothing replayed")
    count = counted["matched"] if selection.ids else len(ids)
    if not _confirmed(args, count, f"{queue}/{topic}", "replay"):
        return _fail("nothing replayed", 1)
    size = REPLAY_CHUNK if args.rate is None else max(1, min(REPLAY_CHUNK, int(args.rate)))
    bar = ProgressBar(len(ids), sys.stderr)
    replayed = done = 0
    try:
        bar.show(0)
        for chunk in chunked(ids, size):
            replayed += _replay_chunk(client, queue, topic, chunk)
            done += len(chunk)
            if args.rate is not None:
                # Wait out this chunk's share of time, counting the call itself: N jobs take
                # N/rate seconds in all, and the bar shows the rate actually kept.
                delay = bar.started + done / args.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            bar.show(done)
    except (ClientError, KeyboardInterrupt):
        bar.close()
        print(f"busgate: stopped after replaying {replayed} of {len(ids)}", file=sys.stderr)
        raise
    bar.close()
    if args.json:
        _print_json({"matched": len(ids), "replayed": replayed})
        return 0
    elapsed = time.monotonic() - bar.started
    line = (
        f"replayed {replayed} of {_count(len(ids), 'dead job')} of {queue}/{topic}"
        f" in {elapsed:.1f}s ({replayed / elapsed if elapsed > 0 else 0:.0f}/s)"
    )
    if replayed < len(ids):
        line += f"; {len(ids) - replayed} were no longer dead"
    print(line)
    return 0


def _replay_chunk(client: AdminClient, queue: str, topic: str, chunk: Sequence[str]) -> int:
    """Replay one chunk of ids; 0 when none of them is dead any more.

    A chunk whose jobs were replayed meanwhile (by another operator, or a typo among
    ``--ids``) is part of the answer, not a reason to stop half-way: the server's 404 then
    says ``"matched": 0``, which a 404 for an unknown queue or topic does not.
    """
    try:
        return int(client.replay(queue, topic, Selection(ids=tuple(chunk)))["replayed"])
    except NotFound as exc:
        if exc.document.get("matched") == 0:
            return 0
        raise


def _matching_ids(client: AdminClient, queue: str, topic: str, selection: Selection) -> list[str]:
    """Every id the filter selects, collected before any is replayed (a replay changes the
    dead list the cursor walks)."""
    where = selection.filter or {}
    ids: dict[str, None] = {}
    for page in client.dead_pages(queue, topic, where):
        ids.update((job["id"], None) for job in page["jobs"])
    return list(ids)


def _dead_delete(args: argparse.Namespace, settings: Settings) -> int:
    queue, topic = _topic(args.target)
    selection = _selection(args)
    client = settings.admin_client()
    counted = client.delete(queue, topic, selection, dry_run=True)
    _note_unconfigured(counted, queue, topic)
    if args.dry_run:
        return _dry_run(args, counted, f"{queue}/{topic}", "deleted")
    if counted["matched"] == 0:  # as for a replay: nothing to ask about
        raise ClientError("no dead job matches that filter")
    if not _confirmed(args, counted["matched"], f"{queue}/{topic}", "delete"):
        return _fail("nothing deleted", 1)
    # The dry run's token: the server deletes the jobs it counted (none if they changed),
    # not also those that failed while the operator read the question.
    result = client.delete(queue, topic, selection, confirm=counted.get("confirm"))
    if args.json:
        _print_json(result)
    else:
        print(f"deleted {_count(result['deleted'], 'dead job')} of {queue}/{topic}")
    return 0


def _dry_run(args: argparse.Namespace, counted: dict[str, Any], where: str, verb: str) -> int:
    if args.json:
        _print_json(counted)
    else:
        print(f"{_count(counted['matched'], 'dead job')} of {where} would be {verb} (dry run)")
    return 0


def _confirmed(args: argparse.Namespace, count: int, where: str, verb: str) -> bool:
    if args.yes:
        return True
    jobs = _count(count, "dead job")
    if not sys.stdin.isatty():
        raise UsageError(f"{verb} {jobs} of {where}? stdin is not a terminal to ask on: add --yes")
    sys.stderr.write(f"{verb.capitalize()} {jobs} of {where}? [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _pause(args: argparse.Namespace, settings: Settings) -> int:
    queue, topic = _topic(args.target)
    return _paused(args, settings.admin_client().pause(queue, topic))


def _resume(args: argparse.Namespace, settings: Settings) -> int:
    queue, topic = _topic(args.target)
    return _paused(args, settings.admin_client().resume(queue, topic))


def _paused(args: argparse.Namespace, document: dict[str, Any]) -> int:
    if args.json:
        _print_json(document)
    else:
        state = "paused" if document["paused"] else "resumed"
        print(f"{state} {document['queue']}/{document['topic']}")
    return 0


def _push(args: argparse.Namespace, settings: Settings) -> int:
    queue, topic = _topic(args.target) if "/" in args.target else (args.target, None)
    if not queue:
        raise UsageError("name a queue, or QUEUE/TOPIC")
    attributes = {}
    for item in args.attr:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--attr {item!r}: write NAME=VALUE")
        try:
            item.encode()
        except UnicodeEncodeError:
            # Bytes of the command line that are not UTF-8 (Python keeps them as surrogates):
            # an attribute is text, and the producer API refuses what UTF-8 cannot say.
            raise UsageError(f"--attr {item!r}: an attribute is UTF-8 text") from None
        attributes[name] = value
    # The bytes as given, whatever they are: a command line's that are not UTF-8 (Python
    # keeps them as surrogates) are the bytes it had, as fsencode gives them back.
    payload = sys.stdin.buffer.read() if args.payload == "-" else os.fsencode(args.payload)
    client = settings.producer_client()
    password = args.password or settings.environ.get(PASSWORD_ENV) or None
    if password is None and (settings.config_given or settings.url is None):
        queue_config = settings.queue_config(queue)
        password = None if queue_config is None else queue_config.password
    document = client.push(
        queue,
        topic,
        payload,
        password=password,
        job_id=args.job_id,
        delay_ms=args.delay_ms,
        priority=args.priority,
        attributes=attributes,
    )
    if args.json:
        _print_json(document)
        return 0
    for job_id in document["ids"]:
        print(job_id)
    if document.get("duplicates"):
        print("busgate: a job with this id is still pending: not enqueued again", file=sys.stderr)
    return 0


# -- pieces -------------------------------------------------------------------------------------


class ProgressBar:
    """``[#####     ] 500/1000 jobs, 100/s`` redrawn in place on a terminal; elsewhere (a
    log, a pipe) a line ``replayed 500/1000 jobs, 100/s`` every PROGRESS_LINE_INTERVAL, so a
    slow ``--rate`` replay in a script is not silent for minutes."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.stream = stream
        self.live = stream.isatty()
        self.started = time.monotonic()
        self._drawn = False
        self._line_at = self.started  # when the last line was written, off a terminal

    def show(self, done: int) -> None:
        now = time.monotonic()
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        if not self.live:
            if now - self._line_at >= PROGRESS_LINE_INTERVAL and done < self.total:
                self._line_at = now
                self.stream.write(f"busgate: replayed {done}/{self.total} jobs, {rate:.0f}/s\n")
                self.stream.flush()
            return
        filled = BAR_WIDTH * done // self.total if self.total else BAR_WIDTH
        bar = "#" * filled + " " * (BAR_WIDTH - filled)
        self.stream.write(f"\r[{bar}] {done}/{self.total} jobs, {rate:.0f}/s")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def _topic(target: str) -> tuple[str, str]:
    queue, sep, topic = target.partition("/")
    if not sep or not queue or not topic or "/" in topic:
        raise UsageError(f"{target!r}: write QUEUE/TOPIC")
    return queue, topic


def _filter(args: argparse.Namespace) -> dict[str, Any]:
    """The dead-job filter the server reads (``DeadFilter``), from the command line."""
    now = time.time()
    where: dict[str, Any] = {}
    if args.status is not None:
        where["status"] = args.status
    if args.error:
        where["error"] = args.error
    if args.since is not None:
        where["since"] = parse_when(args.since, "--since", now)
    if args.until is not None:
        where["until"] = parse_when(args.until, "--until", now)
    if args.attribute is not None:
        where["attribute"] = args.attribute
    return where


def _selection(args: argparse.Namespace) -> Selection:
    where = _filter(args)
    given = [bool(args.ids), bool(where), args.all]
    if sum(given) != 1:
        raise UsageError(
            "name the dead jobs with one of --ids ID…, a filter (--status, --error, --since,"
            " --until, --attribute) or --all"
        )
    if args.ids:
        return Selection(ids=tuple(args.ids))
    if where:
        return Selection(filter=where)
    return Selection(all=True)


def parse_when(text: str, option: str, now: float) -> float:
    """Unix seconds from unix seconds, ISO-8601 (local time unless it says), or ``1h`` ago."""
    value = text.strip()
    if _UNIX_SECONDS.fullmatch(value):
        return float(value)
    try:
        return now - parse_duration(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(
            f"{option} {text!r}: write unix seconds, an ISO-8601 time (2024-05-01T12:00)"
            " or how long ago (90s, 30m, 1h, 7d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # the operator's local time
    return moment.timestamp()


def _print_json(document: Any) -> None:
    # JSON escapes C0 itself, not DEL, C1 or a lone surrogate (which print cannot encode):
    # those as JSON's own escapes ("\u009b"), the same JSON, safe on a terminal too.
    text = json.dumps(document, indent=2, ensure_ascii=False)
    print(_JSON_UNPRINTABLE.sub(lambda match: f"\\u{ord(match[0]):04x}", text))


def _table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    right: set[int] | None = None,
    indent: str = "",
) -> str:
    right = right or set(range(1, len(header)))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append(indent + "  ".join(cells).rstrip())
    return "\n".join(lines)


def _when(moment: float | None) -> str:
    if moment is None:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(moment))
    except (OverflowError, OSError, ValueError):  # past what the C library can show
        return f"{moment:.0f}"


def _oneline(text: str, limit: int) -> str:
    flat = _escaped(text.strip())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _escaped(text: str) -> str:
    """A producer's text, safe to print for a human: on one line, every control character
    and lone surrogate written as an escape (\\n, \\x1b, \\ud800), a backslash as \\\\."""
    return _UNPRINTABLE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match[0]
    code = ord(char)
    return _SHORT_ESCAPES.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def _payload(job: Mapping[str, Any], limit: int = 120) -> str:
    """The payload on one line; ``…`` at the end when it is cut, here or by the server (a
    dead-letter listing carries the first KiB, and says its whole size)."""
    payload = job.get("payload", "")
    cut = bool(job.get("payload_truncated"))
    if job.get("payload_encoding") == "base64":
        size = job.get("payload_size", len(payload) * 3 // 4 - payload[-2:].count("="))
        shown = _oneline(payload, limit)
        ellipsis = "…" if cut and not shown.endswith("…") else ""
        return f"(binary, {_count(size, 'byte')}) base64:{shown}{ellipsis}"
    shown = _oneline(payload, limit)
    return shown + "…" if cut and not shown.endswith("…") else shown


def _count(n: int, noun: str, plural: str | None = None) -> str:
    if n == 1:
        return f"1 {noun}"
    return f"{n} {plural or noun + 's'}"
