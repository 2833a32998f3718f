"""The OpenAPI document of the gateway's jobs API, served at ``GET /openapi.json``."""

from __future__ import annotations

from typing import Any, Final

from producer.protocol import VERSION

_ERROR = {"$ref": "#/components/schemas/Error"}
_JOB_ID = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
}


def _response(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {"application/json": {"schema": schema}}
    return out


_ERRORS = {
    "401": _response("missing or invalid API key", _ERROR),
    "404": _response("no such job (or not this key's)", _ERROR),
}

OPENAPI: Final[dict[str, Any]] = {
    "openapi": "3.1.0",
    "info": {
        "title": "tokenrelay gateway",
        "version": f"protocol {VERSION}",
        "description": (
            "Every request becomes a queued job run by a worker; events are streamed as "
            "Server-Sent Events. Together (POST /inference) and OpenAI (POST /v1/completions, "
            "POST /v1/chat/completions) compatible routes follow those APIs' own documents."
        ),
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "properties": {
                    "error": {
                        "type": "object",
                        "properties": {
                            "message": {"type": "string"},
                            "type": {"type": "string"},
                            "param": {"type": ["string", "null"]},
                            "code": {"type": ["string", "null"]},
                        },
                        "required": ["message", "type"],
                    }
                },
            },
            "JobRequest": {
                "type": "object",
                "properties": {
                    "prompt": {"type": "string", "description": "the prompt (or messages)"},
                    "messages": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "role": {"enum": ["system", "user", "assistant"]},
                                "content": {"type": "string"},
                            },
                        },
                    },
                    "model": {"type": "string"},
                    "max_tokens": {"type": "integer", "minimum": 1},
                    "stop": {"oneOf": [{"type": "string"}, {"type": "array"}]},
                    "temperature": {"type": "number"},
                    "top_p": {"type": "number"},
                    "top_k": {"type": "integer"},
                    "repetition_penalty": {"type": "number"},
                    "dialect": {"type": "string"},
                    "on_interrupt": {"enum": ["error", "continue"]},
                    "deadline": {"type": "number", "description": "seconds"},
                    "job_id": {
                        "type": "string",
                        "description": "choose the id: submitting it again returns the job",
                    },
                },
            },
            "JobState": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "status": {"enum": ["queued", "running", "done", "error", "cancelled"]},
                    "model": {"type": "string"},
                    "attempt": {"type": "integer"},
                    "tokens": {"type": "integer"},
                    "finish_reason": {"type": "string"},
                    "usage": {"type": "object"},
                    "error": {"type": "object"},
                    "events_url": {"type": "string"},
                },
            },
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/v1/jobs": {
            "post": {
                "summary": "Enqueue a job",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}}
                    },
                },
                "responses": {
                    "202": _response("queued", {"$ref": "#/components/schemas/JobState"}),
                    "400": _response("malformed JSON", _ERROR),
                    "409": _response("job_id taken by another key", _ERROR),
                    "413": _response("body too large", _ERROR),
                    "422": _response("a field is invalid (named in error.param)", _ERROR),
                    **_ERRORS,
                },
            }
        },
        "/v1/jobs/{job_id}": {
            "get": {
                "summary": "A job's state",
                "parameters": [_JOB_ID],
                "responses": {
                    "200": _response("the state", {"$ref": "#/components/schemas/JobState"}),
                    **_ERRORS,
                },
            }
        },
        "/v1/jobs/{job_id}/events": {
            "get": {
                "summary": "The job's events as Server-Sent Events",
                "description": (
                    "Each event: `id:` its seq, `data:` the protocol event "
                    '`{"v":1,"job":…,"seq":…,"type":…}`. Resumes after `Last-Event-ID` (header, '
                    "or `last_event_id` query); the stream ends after the terminal event. "
                    "A `: keep-alive` comment is sent on idle streams."
                ),
                "parameters": [
                    _JOB_ID,
                    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "integer"}},
                    {"name": "access_token", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {
                        "description": "event stream",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **_ERRORS,
                },
            }
        },
        "/v1/jobs/{job_id}/cancel": {
            "post": {
                "summary": "Cancel a job",
                "parameters": [_JOB_ID],
                "responses": {
                    "200": _response("the state", {"$ref": "#/components/schemas/JobState"}),
                    **_ERRORS,
                },
            }
        },
    },
}
