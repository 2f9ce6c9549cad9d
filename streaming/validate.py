"""Decode and validate one Kafka record against the event schema (rentalml.schema); a bad record becomes a
`dead_letter` document (contracts.md) whose reason names the field."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

from pydantic import ValidationError

from rentalml.kafka import PROPERTY_DATA, USER_INTERACTIONS
from rentalml.schema import Interaction, PropertyEvent

MODELS = {USER_INTERACTIONS: Interaction, PROPERTY_DATA: PropertyEvent}


class InvalidEvent(ValueError):
    """The record cannot be processed; `reason` says why (naming the field where there is one)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "<event>"
        parts.append(f"field '{loc}': {err['msg']}")
    return "invalid event: " + "; ".join(parts)


def parse(topic: str, value: bytes | None) -> Interaction | PropertyEvent:
    """The validated event of a record value, or InvalidEvent.

    The common case (a valid event) is one `model_validate_json` call, pydantic-core parsing the bytes without
    a Python dict in between; a record it refuses takes the step-by-step path below, which names the reason
    (not UTF-8, malformed JSON, not an object, the field), so both accept and refuse the same records."""
    model = MODELS.get(topic)
    if model is not None and value:
        try:
            return model.model_validate_json(value)
        except ValidationError:
            pass
    return _parse_slow(topic, value)


def _parse_slow(topic: str, value: bytes | None) -> Interaction | PropertyEvent:
    if value is None:
        raise InvalidEvent("empty record (null value)")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"payload is not UTF-8: {exc}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidEvent(f"malformed JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidEvent(f"event must be a JSON object, got {type(doc).__name__}")
    model = MODELS.get(topic)
    if model is None:
        raise InvalidEvent(f"no event schema for topic {topic!r}")
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise InvalidEvent(_reason(exc)) from None


def dead_letter(topic: str, partition: int, offset: int, reason: str, value: bytes | None) -> dict:
    """The `dead_letter` document (contracts.md): the raw payload as text, or base64 when it is not UTF-8."""
    if value is None:
        payload = ""
    else:
        try:
            payload = value.decode("utf-8")
        except UnicodeDecodeError:
            payload = base64.b64encode(value).decode("ascii")
    return {"topic": topic, "partition": partition, "offset": offset, "reason": reason, "payload": payload,
            "received_at": datetime.now(UTC).isoformat()}
