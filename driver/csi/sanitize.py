"""Protobuf messages as JSON-able dicts for logs, with secrets and service-account tokens
replaced by a marker.

The CSI spec marks every field that carries credentials with the ``csi_secret`` field
option, so which fields to strip is read from the descriptors, not from a list of names
that would miss the next spec release's new ``secrets`` field (kubernetes-csi
csi-lib-utils ``protosanitizer`` does the same in Go). One thing the option cannot mark:
kubelet puts the pod's projected service-account tokens into ``volume_context`` under
``csi.storage.k8s.io/serviceAccount.tokens``, an ordinary map. That key is stripped by
name, in every map of every message, so a token is never logged wherever it is echoed
(volume_context of any request, Volume.volume_context, parameters, publish_context).

Bytes fields are rendered as base64 (as protobuf's own JSON mapping does): CSI has no
secret bytes fields, and the option check happens before any value is rendered.
"""

from __future__ import annotations

import base64
import functools
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from csi import csi_pb2

STRIPPED = "***stripped***"
TOKENS_KEY = "csi.storage.k8s.io/serviceAccount.tokens"

# Well-known types rendered as their JSON form rather than as nested dicts.
_WRAPPERS = {f"google.protobuf.{name}Value" for name in
             ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")}
_JSON_STRING_TYPES = {"google.protobuf.Timestamp", "google.protobuf.Duration"}


def strip_secrets(message: Message | None) -> dict[str, Any] | None:
    """A JSON-able dict of ``message`` (proto field names, set fields only) in which every
    ``csi_secret`` field and every service-account tokens map entry is ``STRIPPED``."""
    if message is None:
        return None
    return _message(message)


@functools.cache
def _is_secret(field: FieldDescriptor) -> bool:
    return bool(field.GetOptions().Extensions[csi_pb2.csi_secret])


@functools.cache
def _is_map(field: FieldDescriptor) -> bool:
    return (field.type == FieldDescriptor.TYPE_MESSAGE
            and field.message_type.GetOptions().map_entry)


def _message(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        if _is_secret(field):
            out[field.name] = STRIPPED
        elif _is_map(field):
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {
                str(key): STRIPPED if key == TOKENS_KEY else _value(value_field, item)
                for key, item in value.items()}
        elif field.is_repeated:
            out[field.name] = [_value(field, item) for item in value]
        else:
            out[field.name] = _value(field, value)
    return out


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _nested(field.message_type, value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        enum_value = field.enum_type.values_by_number.get(value)
        return enum_value.name if enum_value is not None else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    return value


def _nested(descriptor: Descriptor, value: Message) -> Any:
    if descriptor.full_name in _WRAPPERS:
        return _value(descriptor.fields_by_name["value"], value.value)
    if descriptor.full_name in _JSON_STRING_TYPES:
        return value.ToJsonString()
    return _message(value)
