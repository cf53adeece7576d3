"""``/openapi.json``: the HTTP API, described for people and for tools (OpenAPI 3.1)."""

from __future__ import annotations

from typing import Any

from adapters.storage.jobs import EXCERPT_BYTES
from gateway import __version__

_TOPIC_PARAMS = [
    {"name": "queue", "in": "path", "required": True, "schema": {"type": "string"}},
    {"name": "topic", "in": "path", "required": True, "schema": {"type": "string"}},
]
#: The producer API reads the W3C trace header for every job a push carries.
_TRACEPARENT = {
    "name": "traceparent",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": (
        "W3C trace context: the trace of every job of the request that names none of its own"
        " (a JSON job's \"traceparent\", a raw body's traceparent query parameter). One that"
        " is not a valid W3C trace context is ignored, as W3C says."
    ),
}
#: A raw body's options (never with a JSON body, where they are the job's fields: a 400).
_RAW_OPTIONS = [
    {
        "name": name,
        "in": "query",
        "required": False,
        "schema": {"type": "integer" if name == "delay_ms" else "string"},
        "description": "For a raw (not JSON) body; attributes as attr.NAME=value.",
    }
    for name in ("id", "delay_ms", "priority", "traceparent")
]
_ERROR = {
    "description": "What is wrong, in words",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): _ERROR for code in codes}


#: The dead-letter endpoints also serve a topic that is no longer configured.
_REMOVED_TOPICS = (
    " The topic may be one a reload removed from the configuration (or whose queue it"
    " removed): its jobs stay in the store, and its dead ones can still be listed and"
    ' deleted; the answer then says "configured": false. A queue or topic the store has'
    " never held a job of is a 404."
)
_CONFIGURED = {
    "type": "boolean",
    "const": False,
    "description": "Present, and false, only for a topic that is not in the configuration.",
}


def _selection(action: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": f'Which dead jobs to {action}: exactly one of "ids", "filter", "all".',
        "properties": {
            "ids": {
                "type": "array",
                "items": {"type": "string"},
                "minItems": 1,
                "description": (
                    "Ids that are not dead jobs of this topic are skipped. When none is (nor"
                    ' any job matches a filter), the 404 carries "matched": 0, which a 404'
                    " for an unknown queue or topic does not."
                ),
            },
            "filter": _ref("DeadFilter"),
            "all": {"type": "boolean", "const": True},
            "dry_run": {
                "type": "boolean",
                "description": (
                    'Count the matches, change nothing; with "filter" or "all", the answer\'s'
                    ' "confirm" names the jobs counted.'
                ),
            },
            "confirm": {
                "type": "string",
                "description": (
                    "A dry run's token, with the same filter or all: act on exactly the jobs"
                    " it counted (failures since are left alone), or, if some of them were"
                    " replayed or deleted meanwhile, on none (409)."
                ),
            },
        },
        "additionalProperties": False,
    }


def document() -> dict[str, Any]:
    admin: list[dict[str, list[str]]] = [{"bearer": []}]
    topic = "/v1/queues/{queue}/topics/{topic}"
    replay_body = _selection("replay")
    replay_body["properties"]["rate"] = {
        "type": "number",
        "exclusiveMinimum": 0,
        "description": (
            "Jobs per second (finite); the call returns when all are replayed, so it is"
            " refused (400) if that would take over 600 seconds."
        ),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "busgate",
            "version": __version__,
            "description": "Producer, admin and operator API of a busgate daemon.",
        },
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The token in admin_token_file.",
                },
                "queue": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "User: the queue; password: its password. A Bearer"
                    " header with the queue's password works too.",
                },
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}},
                },
                "NewJob": {
                    "type": "object",
                    "required": ["payload"],
                    "properties": {
                        "payload": {
                            "description": "A string is sent as its UTF-8 bytes;"
                            " anything else as the JSON text it was written as.",
                        },
                        "id": {
                            "type": "string",
                            "description": "Idempotency key: 1-128 letters, digits and"
                            " _ . : @ + = -, not . or .. (no URL can name those).",
                        },
                        "delay_ms": {"type": "integer", "minimum": 0},
                        "priority": {"enum": ["high", "normal", "low"]},
                        "attributes": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        },
                        "traceparent": {
                            "type": "string",
                            "description": "W3C trace context; wins over the request's"
                            " traceparent header.",
                        },
                    },
                    "additionalProperties": False,
                },
                "DeadFilter": {
                    "type": "object",
                    "properties": {
                        "status": {"type": "integer"},
                        "error": {"type": "string", "description": "Substring, any case."},
                        "since": {"type": "number", "description": "Unix seconds."},
                        "until": {"type": "number", "description": "Unix seconds."},
                        "attribute": {
                            "type": "string",
                            "description": "name:value, split at the first ':' (one in the"
                            " name as \\:, a backslash as \\\\).",
                        },
                    },
                    "additionalProperties": False,
                },
                "Attempt": {
                    "type": "object",
                    "properties": {
                        "attempt": {"type": "integer"},
                        "started_at": {"type": "number"},
                        "duration_ms": {"type": "number"},
                        "outcome": {"enum": ["done", "retry", "dead", "expired", "released"]},
                        "status": {"type": ["integer", "null"]},
                        "error": {"type": ["string", "null"]},
                        "body": {"type": "string", "description": "First KiB."},
                        "stderr": {"type": "string", "description": "First KiB (FastCGI)."},
                    },
                },
                "Job": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "queue": {"type": "string"},
                        "topic": {"type": "string"},
                        "state": {"enum": ["ready", "delayed", "leased", "dead", "done"]},
                        "payload": {"type": "string"},
                        "payload_encoding": {"enum": ["utf-8", "base64"]},
                        "attributes": {"type": "object"},
                        "priority": {"enum": ["high", "normal", "low"]},
                        "attempt": {"type": "integer"},
                        "enqueued_at": {"type": "number"},
                        "run_at": {"type": "number"},
                        "finished_at": {"type": ["number", "null"]},
                        "trace_id": {"type": "string"},
                        "attempts": {"type": "array", "items": _ref("Attempt")},
                    },
                },
                "DeadJob": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "payload": {
                            "type": "string",
                            "description": f"The first {EXCERPT_BYTES} bytes of the payload"
                            " (text cut where a character starts; base64 of them when the"
                            " payload is not UTF-8), or all of it with payload=full.",
                        },
                        "payload_encoding": {"enum": ["utf-8", "base64"]},
                        "payload_size": {
                            "type": "integer",
                            "description": "The whole payload's size in bytes.",
                        },
                        "payload_truncated": {
                            "type": "boolean",
                            "description": "Whether payload is cut: GET /v1/jobs/{job_id}, or"
                            " this list with payload=full, gives it whole.",
                        },
                        "attributes": {"type": "object"},
                        "attempt": {"type": "integer"},
                        "died_at": {"type": "number"},
                        "status": {"type": ["integer", "null"]},
                        "error": {"type": ["string", "null"]},
                    },
                },
                "TopicStats": {
                    "type": "object",
                    "description": "One topic in the stats snapshot (refreshed every second).",
                    "properties": {
                        "queue": {"type": "string"},
                        "topic": {"type": "string"},
                        "backend": {"type": ["string", "null"]},
                        "kind": {"enum": ["fastcgi", "http", None]},
                        "concurrency": {"type": "integer"},
                        "in_flight": {"type": "integer"},
                        "buffered": {"type": "integer"},
                        "paused": {"type": "boolean"},
                        "circuit": {
                            "type": "object",
                            "properties": {
                                "state": {"enum": ["closed", "open", "half-open"]},
                                "opened_total": {"type": "integer"},
                                "consecutive_failures": {"type": "integer"},
                            },
                        },
                        "rate_limit": {"type": ["number", "null"]},
                        "depth": {
                            "type": "object",
                            "properties": {
                                k: {"type": "integer"}
                                for k in ("ready", "delayed", "leased", "dead", "done_kept")
                            },
                        },
                        "totals": {
                            "type": "object",
                            "properties": {
                                k: {"type": "integer"}
                                for k in (
                                    "pushed",
                                    "done",
                                    "retried",
                                    "dead",
                                    "failed",
                                    "expired",
                                    "replayed",
                                    "unmatched",
                                )
                            },
                        },
                        "rates": {
                            "type": "object",
                            "properties": {
                                k: {"type": "number"}
                                for k in (
                                    "in_per_second",
                                    "in_per_minute",
                                    "out_per_second",
                                    "out_per_minute",
                                )
                            },
                        },
                        "duration_ms": {
                            "type": "object",
                            "properties": {
                                "p50": {"type": ["number", "null"]},
                                "p95": {"type": ["number", "null"]},
                                "p99": {"type": ["number", "null"]},
                                "samples": {"type": "integer"},
                            },
                        },
                        "backend_errors": {
                            "type": "object",
                            "additionalProperties": {"type": "integer"},
                        },
                        "backend_health": {
                            "type": ["object", "null"],
                            "description": "php-fpm status (status_path).",
                        },
                        "configured": {
                            "const": False,
                            "description": "Present, false, on a topic the configuration"
                            " lacks (removed by a reload) that still holds ready, delayed,"
                            " leased or dead jobs: nothing delivers them until it is"
                            " configured again. Its backend, kind and rate_limit are then"
                            " null, its concurrency and in flight 0.",
                        },
                    },
                },
            },
        },
        "paths": {
            "/v1/queues/{queue}/jobs": {
                "post": {
                    "summary": "Push jobs (producer API)",
                    "security": [{"queue": []}],
                    "parameters": [_TOPIC_PARAMS[0], _TRACEPARENT, *_RAW_OPTIONS],
                    "requestBody": {
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [
                                        _ref("NewJob"),
                                        {
                                            "type": "object",
                                            "required": ["jobs"],
                                            "properties": {
                                                "jobs": {
                                                    "type": "array",
                                                    "items": _ref("NewJob"),
                                                    "maxItems": 1000,
                                                }
                                            },
                                        },
                                    ]
                                }
                            },
                            "application/octet-stream": {
                                "schema": {
                                    "type": "string",
                                    "format": "binary",
                                    "description": "One job, the body as sent;"
                                    " options as query parameters.",
                                }
                            },
                        }
                    },
                    "responses": {
                        "202": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "ids": {"type": "array", "items": {"type": "string"}},
                                    "duplicates": {"type": "integer"},
                                },
                            },
                            "Stored durably",
                        ),
                        **_errors(400, 401, 403, 404, 413, 415, 503),
                    },
                },
            },
            "/v1/queues/{queue}/{topic}/jobs": {
                "post": {
                    "summary": "Push jobs to one topic only (no fan-out)",
                    "security": [{"queue": []}],
                    "parameters": [*_TOPIC_PARAMS, _TRACEPARENT, *_RAW_OPTIONS],
                    "responses": {
                        "202": {"description": "Stored durably"},
                        **_errors(400, 401, 403, 404, 413, 415, 503),
                    },
                },
            },
            "/healthz": {
                "get": {
                    "summary": "The process is up",
                    "security": [],
                    "responses": {"200": {"description": "ok"}},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "The store answers and the daemon is not draining",
                    "security": [],
                    "responses": {"200": {"description": "ready"}, **_errors(503)},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "security": admin,
                    "responses": {"200": {"description": "text format 0.0.4"}, **_errors(401, 403)},
                }
            },
            "/v1/stats": {
                "get": {
                    "summary": "Every queue and topic: depths, rates, durations, circuit",
                    "security": admin,
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "generated_at": {"type": ["number", "null"]},
                                    "uptime": {"type": "number"},
                                    "store": {
                                        "type": "object",
                                        "description": "Whether the last sample (every"
                                        " second) reached the store.  While it does not, the"
                                        " figures are those of generated_at.",
                                        "properties": {
                                            "ok": {"type": "boolean"},
                                            "error": {"type": ["string", "null"]},
                                            "since": {
                                                "type": ["number", "null"],
                                                "description": "unix time of the first"
                                                " failed sample of this outage",
                                            },
                                        },
                                    },
                                    "queues": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "properties": {
                                                "name": {"type": "string"},
                                                "password": {"type": "boolean"},
                                                "topics": {
                                                    "type": "array",
                                                    "items": _ref("TopicStats"),
                                                },
                                                "configured": {
                                                    "const": False,
                                                    "description": "Present, false, on a"
                                                    " queue the configuration lacks whose"
                                                    " topics still hold jobs (its password"
                                                    " is then false)",
                                                },
                                            },
                                        },
                                    },
                                },
                            }
                        ),
                        **_errors(401, 403),
                    },
                }
            },
            topic: {
                "get": {
                    "summary": "One topic's stats with its recent failures (also of a topic"
                    " removed by a reload while it holds jobs)",
                    "security": admin,
                    "parameters": _TOPIC_PARAMS,
                    "responses": {
                        "200": {"description": "TopicStats plus recent_failures"},
                        **_errors(401, 403, 404),
                    },
                }
            },
            "/v1/jobs/{job_id}": {
                "get": {
                    "summary": "A job by id: every topic copy with every attempt",
                    "security": admin,
                    "parameters": [
                        {
                            "name": "job_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "id": {"type": "string"},
                                    "copies": {"type": "array", "items": _ref("Job")},
                                },
                            }
                        ),
                        **_errors(401, 403, 404, 503),
                    },
                }
            },
            topic + "/dead": {
                "get": {
                    "summary": "Dead jobs, newest first, filtered and paged",
                    "description": "Of a configured topic." + _REMOVED_TOPICS,
                    "security": admin,
                    "parameters": [
                        *_TOPIC_PARAMS,
                        *(
                            {"name": name, "in": "query", "schema": schema}
                            for name, schema in (
                                ("status", {"type": "integer"}),
                                ("error", {"type": "string"}),
                                ("since", {"type": "number"}),
                                ("until", {"type": "number"}),
                                ("attribute", {"type": "string"}),
                                ("cursor", {"type": "string"}),
                                ("limit", {"type": "integer", "minimum": 1, "maximum": 500}),
                            )
                        ),
                        {
                            "name": "payload",
                            "in": "query",
                            "schema": {"enum": ["excerpt", "full"], "default": "excerpt"},
                            "description": f"excerpt: each payload's first {EXCERPT_BYTES}"
                            " bytes; full: whole payloads (an export).",
                        },
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "jobs": {"type": "array", "items": _ref("DeadJob")},
                                    "cursor": {
                                        "type": ["string", "null"],
                                        "description": "Pass back for the next page.",
                                    },
                                    "configured": _CONFIGURED,
                                },
                            }
                        ),
                        **_errors(400, 401, 403, 404, 503),
                    },
                }
            },
            topic + "/dead/replay": {
                "post": {
                    "summary": "Replay dead jobs: by ids, by filter, or all; optionally at a rate",
                    "description": (
                        "Of a configured topic only: a topic that is not in the configuration"
                        " (removed by a reload) has no dispatcher, so its replayed jobs would"
                        " wait undelivered. Its replay, dry runs included, is a 409: add the"
                        " topic back and reload first, or delete the jobs."
                    ),
                    "security": admin,
                    "parameters": _TOPIC_PARAMS,
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": replay_body}},
                    },
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "matched": {"type": "integer"},
                                    "replayed": {"type": "integer"},
                                    "dry_run": {"type": "boolean"},
                                    "confirm": {"type": "string"},
                                },
                            }
                        ),
                        **_errors(400, 401, 403, 404, 415, 503),
                        "409": {
                            **_ERROR,
                            "description": (
                                "The topic is not configured (removed by a reload), or the"
                                " confirmed jobs changed since the dry run"
                            ),
                        },
                    },
                }
            },
            topic + "/dead/delete": {
                "post": {
                    "summary": "Delete dead jobs: by ids, by filter, or all",
                    "description": "Of a configured topic." + _REMOVED_TOPICS,
                    "security": admin,
                    "parameters": _TOPIC_PARAMS,
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _selection("delete")}},
                    },
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "matched": {"type": "integer"},
                                    "deleted": {"type": "integer"},
                                    "dry_run": {"type": "boolean"},
                                    "confirm": {"type": "string"},
                                    "configured": _CONFIGURED,
                                },
                            }
                        ),
                        **_errors(400, 401, 403, 404, 415, 503),
                        "409": {
                            **_ERROR,
                            "description": "The confirmed jobs changed since the dry run",
                        },
                    },
                }
            },
            topic + "/pause": {
                "post": {
                    "summary": "Stop reserving jobs for this topic (pushes still accepted)",
                    "security": admin,
                    "parameters": _TOPIC_PARAMS,
                    "responses": {"200": {"description": "paused"}, **_errors(401, 403, 404, 415)},
                }
            },
            topic + "/resume": {
                "post": {
                    "summary": "Resume delivering",
                    "security": admin,
                    "parameters": _TOPIC_PARAMS,
                    "responses": {"200": {"description": "resumed"}, **_errors(401, 403, 404, 415)},
                }
            },
            topic + "/test-delivery": {
                "post": {
                    "summary": "Send a payload to the topic's backend now; nothing is stored",
                    "security": admin,
                    "parameters": _TOPIC_PARAMS,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "payload": {},
                                        "payload_base64": {"type": "string"},
                                        "attributes": {
                                            "type": "object",
                                            "additionalProperties": {"type": "string"},
                                        },
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "job_id": {"type": "string"},
                                    "status": {"type": ["integer", "null"]},
                                    "duration_ms": {"type": "number"},
                                    "headers": {"type": "array", "items": {"type": "array"}},
                                    "body": {"type": "string"},
                                    "stderr": {"type": "string"},
                                    "failure": {"type": ["string", "null"]},
                                    "message": {"type": ["string", "null"]},
                                },
                            }
                        ),
                        **_errors(400, 401, 403, 404, 415),
                    },
                }
            },
            "/v1/config": {
                "get": {
                    "summary": "The effective configuration, secrets redacted, and its main"
                    " file's path",
                    "security": admin,
                    "responses": {"200": {"description": "as JSON"}, **_errors(401, 403)},
                }
            },
            "/v1/live": {
                "get": {
                    "summary": 'WebSocket: send {"token": …} first; then a "stats" message every'
                    ' second and "attempt" events (at most 50 per second)',
                    "security": [],
                    "responses": {
                        "101": {"description": "Switching protocols"},
                        **_errors(426),  # a GET without the WebSocket handshake
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": {"description": "OpenAPI 3.1"}},
                }
            },
            "/": {
                "get": {
                    "summary": "The dashboard",
                    "security": [],
                    "responses": {"200": {"description": "HTML"}},
                }
            },
        },
    }
