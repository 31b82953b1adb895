"""Policy documents (the YAML of policy files) to and from `fabric.v1.PolicyObject`.

The messages' proto3 JSON names are the documents' keys, so the mapping is
`json_format` both ways. A file may spell a rate or a port as a YAML number where the
message has a string; `object_from_document` turns such numbers into their text, led by
the message descriptors, so both spellings reach the agent's validation unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from agent.common.policy.model import PolicyError, PolicyObject, PolicyViolation, validate_object
from agent.proto.fabric.v1 import qos_service_pb2

# The oneof field of a PolicyObject for each document `kind`.
KINDS: dict[str, str] = {"QosPolicy": "policy", "QosAssignment": "assignment"}


class ObjectError(ValueError):
    """A document that does not fit the message: `path` (YAML names) and why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


def object_from_document(document: object) -> qos_service_pb2.PolicyObject:
    """The PolicyObject for one policy document; raises ObjectError."""
    if not isinstance(document, Mapping):
        raise ObjectError("", f"a policy must be a mapping, got {type(document).__name__}")
    kind = document.get("kind")
    if kind not in KINDS:
        known = " or ".join(KINDS)
        raise ObjectError("kind", f"must be {known}, got {kind!r}")
    obj = qos_service_pb2.PolicyObject()
    message = getattr(obj, KINDS[str(kind)])
    coerced = _coerce(document, message.DESCRIPTOR)
    try:
        json_format.ParseDict(coerced, message)
    except json_format.ParseError as exc:
        raise ObjectError("", str(exc)) from None
    return obj


def document_from_object(obj: qos_service_pb2.PolicyObject) -> tuple[str, dict[str, Any]]:
    """(kind field, document) of a PolicyObject; an empty oneof gives ('', {})."""
    which = obj.WhichOneof("kind")
    if which is None:
        return "", {}
    message: Message = getattr(obj, which)
    return which, json_format.MessageToDict(message)


def name_of(obj: qos_service_pb2.PolicyObject) -> str:
    which = obj.WhichOneof("kind")
    if which is None:
        return ""
    return str(getattr(obj, which).metadata.name)


def _coerce(value: Any, descriptor: Descriptor | None) -> Any:
    """Numbers given for string fields become strings, recursively; anything else is left
    to ParseDict (which names what it rejects)."""
    if not isinstance(value, Mapping) or descriptor is None:
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        field = descriptor.fields_by_camelcase_name.get(str(key))
        if field is None:
            out[key] = item
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if isinstance(item, list):
                out[key] = [_coerce(x, field.message_type) for x in item]
            else:
                out[key] = _coerce(item, field.message_type)
        elif field.type == FieldDescriptor.TYPE_STRING:
            out[key] = [_text(x) for x in item] if isinstance(item, list) else _text(item)
        else:
            out[key] = item
    return out


def _text(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


# Where a request's violations say they come from (the file of file validation).
REQUEST_SOURCE = "request"


def model_from_request(obj: qos_service_pb2.PolicyObject) -> PolicyObject:
    """The validated model of a request's object; raises PolicyError with field paths
    as the files' validation gives them."""
    which, document = document_from_object(obj)
    if not which:
        reason = "required field is missing: give a policy or an assignment"
        raise PolicyError([PolicyViolation(REQUEST_SOURCE, "object", reason)])
    return validate_object(document, REQUEST_SOURCE)
