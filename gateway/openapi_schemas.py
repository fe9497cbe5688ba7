"""The fixed JSON schemas of the gateway's OpenAPI description (:mod:`pdgate.gateway.openapi`
assembles them with what the config decides)."""

from __future__ import annotations

from typing import Any

SCHEMAS = "#/components/schemas/"


def ref(name: str) -> dict[str, str]:
    return {"$ref": SCHEMAS + name}


TOKEN_ID: dict[str, Any] = {
    "type": "integer",
    "minimum": 0,
    "description": "A token id (the engine refuses one beyond its vocabulary)",
}
TEXT_PARTS: dict[str, Any] = {
    "type": "array",
    "items": {"type": "object", "required": ["type"], "properties": {"type": {"type": "string"}}},
}
# Fields the engine takes that the gateway reads too (length prediction, prefix hashing, whether a stream can
# move); the engine validates them
READ_AND_PASSED_ON: dict[str, Any] = {
    "ignore_eos": {"type": "boolean"},
    "min_tokens": {"type": ["integer", "null"], "minimum": 0},
    "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]},
    "stop_token_ids": {"type": ["array", "null"], "items": TOKEN_ID},
    "cache_salt": {"type": ["string", "null"], "minLength": 1},
    "return_token_ids": {"type": ["boolean", "null"]},
    "response_format": {
        "type": ["object", "null"],
        "required": ["type"],
        "properties": {"type": {"enum": ["text", "json_object", "json_schema"]}},
    },
}
ERROR: dict[str, Any] = {
    "type": "object",
    "description": "OpenAI's error shape",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "integer", "null"]},
            },
        }
    },
}

RESPONSE_INPUT_ITEM: dict[str, Any] = {
    "type": "object",
    "description": "A message item: `type` message (the default), a role, and text or content parts",
    "properties": {
        "type": {"const": "message"},
        "role": {"enum": ["user", "assistant", "system", "developer"]},
        "content": {
            "anyOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "items": {
                        "anyOf": [
                            {
                                "type": "object",
                                "required": ["type", "text"],
                                "properties": {
                                    "type": {"enum": ["input_text", "output_text"]},
                                    "text": {"type": "string"},
                                },
                            },
                            {
                                "type": "object",
                                "required": ["type", "image_url"],
                                "properties": {"type": {"const": "input_image"}, "image_url": {"type": "string"}},
                            },
                        ]
                    },
                },
            ]
        },
    },
    "required": ["role", "content"],
}

RESPONSE_REQUEST: dict[str, Any] = {
    "type": "object",
    "description": "Fields other than these pass to the engine's chat request unchanged. Stored state "
    "(`previous_response_id`, `conversation`, `background: true`), reusable prompts (`prompt`) and `tools` "
    "are refused with a 400.",
    "required": ["model", "input"],
    "properties": {
        "input": {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": RESPONSE_INPUT_ITEM}]},
        "instructions": {"type": ["string", "null"]},
        "max_output_tokens": {"type": ["integer", "null"], "minimum": 1},
        "stream": {"type": "boolean", "default": False},
        "text": {
            "type": ["object", "null"],
            "properties": {
                "format": {
                    "type": "object",
                    "required": ["type"],
                    "properties": {"type": {"enum": ["text", "json_object", "json_schema"]}},
                }
            },
        },
        "tools": {"type": ["array", "null"], "maxItems": 0},
        "metadata": {"type": ["object", "null"], "additionalProperties": {"type": "string"}},
        "store": {"type": ["boolean", "null"]},
        "background": {"enum": [False, None]},
        "previous_response_id": {"type": "null"},
        "conversation": {"type": "null"},
        "prompt": {"type": "null"},
        "n": {"const": 1},
    },
}

USAGE: dict[str, Any] = {
    "type": ["object", "null"],
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
    },
}

STREAM_DATA: dict[str, Any] = {
    "type": "object",
    "description": "A chunk (`choices`), a Responses event (`type`), or the error that ended a stream",
    "anyOf": [
        {"required": ["id", "object", "choices"], "properties": {"choices": {"type": "array"}}},
        {"required": ["type", "sequence_number"], "properties": {"type": {"type": "string"}}},
        {"required": ["error"], "properties": {"error": ERROR["properties"]["error"]}},
    ],
}


def _answer(object_name: str, field: str, field_schema: dict[str, Any]) -> dict[str, Any]:
    """A whole completion or chat completion: its choices carry ``field`` (text or message)."""
    choice = {
        "type": "object",
        "required": ["index", field],
        "properties": {
            "index": {"type": "integer"},
            field: field_schema,
            "finish_reason": {"type": ["string", "null"]},
        },
    }
    return {
        "type": "object",
        "required": ["id", "object", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": object_name},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": choice},
            "usage": USAGE,
        },
    }


ANSWER_SCHEMAS: dict[str, Any] = {
    "Completion": _answer("text_completion", "text", {"type": "string"}),
    "ChatCompletion": _answer(
        "chat.completion",
        "message",
        {
            "type": "object",
            "required": ["role"],
            "properties": {"role": {"type": "string"}, "content": {"type": ["string", "null"]}},
        },
    ),
    "Response": {
        "type": "object",
        "required": ["id", "object", "status", "output"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "response"},
            "created_at": {"type": "integer"},
            "status": {"enum": ["completed", "incomplete", "failed", "in_progress"]},
            "model": {"type": "string"},
            "output": {"type": "array", "items": {"type": "object"}},
            "usage": {
                "type": ["object", "null"],
                "properties": {
                    "input_tokens": {"type": "integer"},
                    "output_tokens": {"type": "integer"},
                    "total_tokens": {"type": "integer"},
                },
            },
        },
    },
    "StreamEvent": {
        "type": "object",
        "description": "One server-sent event: a chunk of the answer as JSON in `data` (chat and completions end "
        "with `data: [DONE]`; Responses events are named in `event`); a stream that breaks after it started "
        "ends with an `error` event",
        "required": ["data"],
        "properties": {
            "event": {"type": "string"},
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {"type": "string", "contentMediaType": "application/json", "contentSchema": STREAM_DATA},
                ]
            },
            "id": {"type": "string"},
        },
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "object", "owned_by", "root", "max_model_len"],
                    "properties": {
                        "id": {"type": "string"},
                        "object": {"const": "model"},
                        "created": {"type": "integer"},
                        "owned_by": {"type": "string"},
                        "root": {"type": "string"},
                        "parent": {"type": "string"},
                        "max_model_len": {"type": "integer"},
                    },
                },
            },
        },
    },
    "Health": {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}},
    "Ready": {
        "type": "object",
        "required": ["ready", "models", "sync"],
        "properties": {
            "ready": {"type": "boolean"},
            "models": {"type": "object", "additionalProperties": {"type": "boolean"}},
            "sync": {"enum": ["off", "ok", "degraded"]},
            "replica": {"type": "string"},
            "leader": {"type": ["string", "null"]},
        },
    },
    "CostModel": {
        "type": "object",
        "required": ["version", "refits", "refit_failures", "records", "latency", "output_length"],
        "properties": {
            "version": {"type": "string", "description": "`prior` until the first refit or load"},
            "refits": {"type": "integer"},
            "refit_failures": {"type": "integer"},
            "records": {"type": "integer"},
            "latency": {"type": "object"},
            "output_length": {"type": "object"},
        },
    },
}

ADMIN_SCHEMAS: dict[str, Any] = {
    "AdminInstance": {
        "type": "object",
        "required": ["id", "url", "role", "serving", "model", "kind", "healthy", "draining", "load", "streams"],
        "properties": {
            "id": {"type": "string"},
            "url": {"type": "string"},
            "role": {"enum": ["prefill", "decode", "both", "flex"]},
            "serving": {"enum": ["prefill", "decode", "both"]},
            "model": {"type": "string"},
            "kind": {"type": "string"},
            "healthy": {"type": "boolean"},
            "circuit": {"type": "string"},
            "last_error": {"type": ["string", "null"]},
            "draining": {"type": "boolean"},
            "drained": {"type": "boolean"},
            "load": {"type": "object"},
            "running_requests": {"type": "integer"},
            "cluster_running_requests": {"type": "integer"},
            "streams": {"type": "array", "items": {"type": "object"}},
            "capabilities": {"type": "array", "items": {"type": "string"}},
            "prefix_index": {"type": "object"},
        },
    },
    "AdminInstanceList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": ref("AdminInstance")}},
    },
    "AdminRemoved": {
        "type": "object",
        "required": ["id", "removed", "url"],
        "properties": {"id": {"type": "string"}, "removed": {"type": "boolean"}, "url": {"type": "string"}},
    },
    "AdminRole": {
        "type": "object",
        "required": ["role"],
        "properties": {"role": {"enum": ["prefill", "decode", "both"]}, "reason": {"type": "string"}},
    },
    "AdminPlan": {
        "type": "object",
        "required": ["object", "enabled", "data", "scaling"],
        "properties": {
            "object": {"const": "list"},
            "enabled": {"type": "boolean"},
            "data": {"type": "array", "items": {"type": "object"}},
            "scaling": {"type": "object"},
        },
    },
    "AdminDiscovery": {
        "type": "object",
        "required": ["enabled"],
        "properties": {
            "enabled": {"type": "boolean", "description": "discovery.kubernetes is configured"},
            "synced": {"type": "boolean", "description": "the pods have been listed"},
            "pods": {"type": "integer", "description": "pods the watch holds"},
            "managed": {"type": "array", "items": {"type": "string"}, "description": "instances it added"},
            "removing": {"type": "array", "items": {"type": "string"}, "description": "instances it drains to remove"},
            "problems": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "pods that cannot join, and why",
            },
            "last_error": {"type": ["string", "null"], "description": "the API's last failure, while it lasts"},
        },
    },
    "AdminMigrateRequest": {
        "type": "object",
        "properties": {"target": {"type": ["string", "null"], "description": "An instance id (default: the policy's)"}},
    },
    "AdminMigration": {
        "type": "object",
        "required": ["request_id", "migrated"],
        "properties": {
            "request_id": {"type": "string"},
            "migrated": {"type": "boolean"},
            "from": {"type": "string"},
            "to": {"type": ["string", "null"]},
            "generated_tokens": {"type": "integer"},
            "replica": {"type": ["string", "null"]},
        },
    },
}
