"""The broker's OpenAPI description, served at ``{prefix}api/openapi.json``."""

_error = {
    "description": "refused",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}
_lease = {
    "application/json": {
        "schema": {
            "type": "object",
            "properties": {"lease": {"$ref": "#/components/schemas/Lease"}},
        }
    }
}
_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}


def _op(summary, ok="200", body=None, params=(), content=None, errors=("400", "401", "403", "404")):
    op = {"summary": summary, "parameters": list(params), "responses": {ok: {"description": "ok"}}}
    if content:
        op["responses"][ok]["content"] = content
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    op["responses"].update({e: _error for e in errors})
    return op


_gpu = {
    "type": "object",
    "required": ["index"],
    "properties": {
        "index": {"type": "integer", "minimum": 0},
        "uuid": {"type": "string"},
        "name": {"type": "string"},
        "memory_total": {"type": "integer"},
        "memory_used": {"type": "integer"},
        "utilization": {"type": "number"},
        "mig": {},
    },
}
_sessions = {"type": "array", "items": {"oneOf": [{"type": "string"}, {"type": "object"}]}}

OPENAPI = {
    "openapi": "3.0.3",
    "info": {
        "title": "jupyter-elastic-gpu broker",
        "version": "1",
        "description": "Leases of remote GPU slices, quotas, the fair queue and the agent pool. "
        "Users authenticate with a JupyterHub token, agents with the agent token "
        "(`Authorization: token <token>`).",
    },
    "servers": [{"url": "/services/elastic-gpu/api"}],
    "components": {
        "securitySchemes": {"token": {"type": "apiKey", "in": "header", "name": "Authorization"}},
        "schemas": {
            "Error": {"type": "object", "properties": {"message": {"type": "string"}}},
            "Lease": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "user": {"type": "string"},
                    "session": {"type": "string"},
                    "kernel_name": {"type": "string", "nullable": True},
                    "notebook": {"type": "string", "nullable": True},
                    "fraction": {"type": "number"},
                    "state": {"type": "string", "enum": ["queued", "granted", "ended"]},
                    "position": {"type": "integer", "nullable": True},
                    "reason": {"type": "string", "nullable": True},
                    "blocked_by": {"type": "array", "items": {"type": "object"}},
                    "agent": {"type": "object", "nullable": True},
                    "gpus": {"type": "array", "items": {"type": "integer"}},
                    "token": {"type": "string", "nullable": True},
                    "created": {"type": "string", "format": "date-time"},
                    "granted_at": {"type": "string", "format": "date-time", "nullable": True},
                    "ended_at": {"type": "string", "format": "date-time", "nullable": True},
                    "expires": {"type": "string", "format": "date-time", "nullable": True},
                },
            },
        },
    },
    "security": [{"token": []}],
    "paths": {
        "/me": {"get": _op("My limit, usage, leases and queued requests")},
        "/pool": {"get": _op("Agents, GPUs and the slices leased on them")},
        "/leases": {
            "get": _op(
                "My active leases; ?all=true: everyone's (admin)",
                params=[{"name": "all", "in": "query", "schema": {"type": "boolean"}}],
            ),
            "post": _op(
                "Ask for a GPU slice: 200 granted, 202 queued",
                body={
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["session", "fraction"],
                    "properties": {
                        "session": {"type": "string", "minLength": 1, "maxLength": 255},
                        "fraction": {"type": "number"},
                        "kernel_name": {"type": "string", "nullable": True},
                        "notebook": {"type": "string", "nullable": True},
                    },
                },
                content=_lease,
                errors=("400", "401", "403", "409"),
            ),
        },
        "/leases/{id}": {
            "get": _op(
                "A lease (owner or admin); ?wait=s long-polls for a change",
                params=[_id, {"name": "wait", "in": "query", "schema": {"type": "number"}}],
                content=_lease,
            ),
            "delete": _op("Release a lease or leave the queue", ok="204", params=[_id]),
        },
        "/leases/{id}/heartbeat": {
            "post": _op(
                "Keep a lease alive; returns a refreshed token", params=[_id], content=_lease
            )
        },
        "/usage": {
            "get": _op(
                "GPU-seconds per user and group (admin)",
                params=[{"name": "since", "in": "query", "schema": {"type": "number"}}],
            )
        },
        "/agents": {
            "get": _op("Registered agents (admin or agent token)"),
            "post": _op(
                "Register an agent (agent token)",
                body={
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["id", "address", "gpus"],
                    "properties": {
                        "id": {"type": "string"},
                        "address": {"type": "string"},
                        "device": {"type": "string"},
                        "gpus": {"type": "array", "items": _gpu},
                        "sessions": _sessions,
                    },
                },
            ),
        },
        "/agents/{id}": {
            "delete": _op("Deregister an agent (agent token)", ok="204", params=[_id])
        },
        "/agents/{id}/heartbeat": {
            "post": _op(
                "Agent heartbeat; returns the leases granted on it (agent token)",
                params=[_id],
                body={
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"gpus": {"type": "array", "items": _gpu}, "sessions": _sessions},
                },
            )
        },
    },
}
