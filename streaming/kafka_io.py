"""Kafka plumbing shared by the processor, the producer and the tests: topic names, client settings (SASL/TLS
from Settings), topic creation."""

from __future__ import annotations

import logging
import time

from rentalml.config import Settings, get_settings

log = logging.getLogger(__name__)

USER_INTERACTIONS = "user_interactions"
PROPERTY_DATA = "property_data"
PROCESSED_DATA = "processed_data"
DEAD_LETTER = "dead_letter"
AB_OUTCOMES = "ab_outcomes"
#: the topics `ensure_topics` creates (contracts.md)
TOPICS = (USER_INTERACTIONS, PROPERTY_DATA, PROCESSED_DATA, DEAD_LETTER, AB_OUTCOMES)
#: the topics the stream processor consumes
INPUT_TOPICS = (PROPERTY_DATA, USER_INTERACTIONS)


def client_config(settings: Settings | None = None) -> dict:
    """kafka-python keyword arguments common to producers, consumers and the admin client: bootstrap servers
    and, for a production cluster (Strimzi), SASL and TLS."""
    k = (settings or get_settings()).kafka
    cfg: dict = {"bootstrap_servers": [s.strip() for s in k.bootstrap_servers.split(",") if s.strip()],
                 "security_protocol": k.security_protocol}
    if k.sasl_mechanism:
        cfg["sasl_mechanism"] = k.sasl_mechanism
        cfg["sasl_plain_username"] = k.sasl_username
        cfg["sasl_plain_password"] = k.sasl_password
    if k.security_protocol in ("SSL", "SASL_SSL"):
        cfg["ssl_check_hostname"] = k.ssl_check_hostname
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(k, name)
            if value is not None:
                cfg[name] = str(value)
    return cfg


def ensure_topics(settings: Settings | None = None, topics: tuple[str, ...] = TOPICS,
                  timeout_s: float = 30.0) -> list[str]:
    """Create the missing topics with `settings.kafka.partitions` partitions; returns the ones created."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    settings = settings or get_settings()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(**client_config(settings), client_id="rentalml-admin")
            break
        except KafkaError:  # broker still starting (NoBrokersAvailable in older kafka-python)
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        created = []
        for topic in missing:  # one at a time: a concurrent creator makes only its topic fail
            try:
                admin.create_topics([NewTopic(topic, settings.kafka.partitions, settings.kafka.replication_factor)])
                created.append(topic)
            except TopicAlreadyExistsError:
                pass
        if created:
            log.info("created topics %s with %d partitions", created, settings.kafka.partitions)
        return created
    finally:
        admin.close()


def producer(settings: Settings | None = None, **kw):
    from kafka import KafkaProducer

    opts = {"acks": "all", "linger_ms": 5, "retries": 5, "max_in_flight_requests_per_connection": 1}
    opts.update(kw)
    return KafkaProducer(**client_config(settings), **opts)
