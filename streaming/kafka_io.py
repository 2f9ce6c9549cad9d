"""Moved to the core: rentalml.kafka (topics, client config, ensure_topics, KafkaAccess). Serving uses the same
client settings and topics, and a deployable never imports another one. This module re-exports the names for
existing callers; new code imports rentalml.kafka."""

from rentalml.kafka import (
    AB_OUTCOMES,
    DEAD_LETTER,
    INPUT_TOPICS,
    OUTPUT_TOPICS,
    PROCESSED_DATA,
    PROPERTY_DATA,
    TOPICS,
    USER_INTERACTIONS,
    KafkaAccess,
    TopicsUnavailable,
    client_config,
    ensure_topics,
    processor_access,
    producer,
)

__all__ = ["AB_OUTCOMES", "DEAD_LETTER", "INPUT_TOPICS", "OUTPUT_TOPICS", "PROCESSED_DATA", "PROPERTY_DATA", "TOPICS",
           "USER_INTERACTIONS", "KafkaAccess", "TopicsUnavailable", "client_config", "ensure_topics",
           "processor_access", "producer"]
