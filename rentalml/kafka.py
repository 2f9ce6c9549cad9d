"""Kafka, a core data-plane contract: topic names (docs/architecture.md, contracts.md), what each component does
on Kafka, client settings (SASL/TLS from Settings), topic checks and creation. The stream processor, the
producer, serving's outcome log and the A/B CLI all use it; none of them imports another for it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from rentalml.config import Settings, get_settings
from rentalml.services import wait_until

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
#: the topics the stream processor produces to
OUTPUT_TOPICS = (PROCESSED_DATA, DEAD_LETTER)


@dataclass(frozen=True)
class KafkaAccess:
    """What one component does on Kafka: the topics it consumes (with its consumer group) and produces to.
    The component ensures exactly `topics` (ensure_topics) and nothing else, so its KafkaUser needs Describe
    on those and never on a topic it does not use (tests/test_platform_kafka.py checks the ACLs)."""

    consumes: tuple[str, ...] = ()
    produces: tuple[str, ...] = ()
    group: str | None = None

    @property
    def topics(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.consumes + self.produces))


def processor_access(settings: Settings | None = None) -> KafkaAccess:
    """The stream processor's Kafka access (streaming/processor.py subscribes, produces and ensures with it)."""
    return KafkaAccess(INPUT_TOPICS, OUTPUT_TOPICS, (settings or get_settings()).stream.group_id)


class TopicsUnavailable(RuntimeError):
    """Topics a component needs are not visible to its principal and could not be created. With Strimzi the
    topics are KafkaTopic objects and the KafkaUsers have no Create: the fix is a KafkaTopic, or a Describe
    ACL on the topic for that user (Kafka only lists the topics a principal may Describe)."""

    def __init__(self, topics: list[str], principal: str, reason: str):
        self.topics, self.principal, self.reason = topics, principal, reason
        super().__init__(
            f"Kafka topics {topics} are not visible to {principal} and were not created ({reason}). In a Strimzi "
            f"cluster: check that a KafkaTopic exists for each and is Ready, and that the KafkaUser grants "
            f"Describe on it (the code never needs Create there).")


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
    """Make sure `topics` exist and are visible to this client; returns the ones it created.

    A topic is visible when the Metadata response lists it, which Kafka does only for the topics the principal
    may Describe. A missing one is created with `settings.kafka.partitions` partitions (local brokers, where
    the code owns the topics). Where the principal may not create it (a Strimzi cluster: the topics are
    KafkaTopic objects and the KafkaUsers have no Create), TopicsUnavailable names the topics, the principal
    and the fix, instead of a bare TOPIC_AUTHORIZATION_FAILED."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import (
        ClusterAuthorizationFailedError,
        KafkaError,
        TopicAlreadyExistsError,
        TopicAuthorizationFailedError,
    )

    settings = settings or get_settings()
    principal = settings.kafka.sasl_username or "the anonymous principal"
    refusals: list[KafkaError] = []

    def connect():
        try:
            return KafkaAdminClient(**client_config(settings), client_id="rentalml-admin")
        except KafkaError as exc:  # broker still starting (NoBrokersAvailable in older kafka-python)
            refusals[:] = [exc]
            return None

    try:
        admin = wait_until(connect, timeout_s, interval=0.5,
                           what=f"a Kafka broker at {settings.kafka.bootstrap_servers}")
    except TimeoutError:
        if refusals:
            raise refusals[-1] from None
        raise
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        created, refused = [], []
        for topic in missing:  # one at a time: a concurrent creator makes only its topic fail
            try:
                admin.create_topics([NewTopic(topic, settings.kafka.partitions, settings.kafka.replication_factor)])
                created.append(topic)
            except TopicAlreadyExistsError:
                pass  # created by someone else meanwhile, or it exists and we may not Describe it: see below
            except (TopicAuthorizationFailedError, ClusterAuthorizationFailedError) as exc:
                refused.append((topic, type(exc).__name__))
        if refused:
            raise TopicsUnavailable([t for t, _ in refused], principal,
                                    f"creating them was refused: {refused[0][1]}")
        if created:
            log.info("created topics %s with %d partitions", created, settings.kafka.partitions)
        return created
    finally:
        admin.close()


def producer_options(settings: Settings | None = None, **kw) -> dict:
    """The producer's settings: acks=all and `kafka.idempotence`, overridden by `kw`. Idempotence needs acks=all
    (kafka-python refuses the pair otherwise), so a caller that asks for acks 0 or 1 — a latency probe, a
    best-effort sink — gets a plain producer instead of a configuration error."""
    s = settings or get_settings()
    opts = {"acks": "all", "linger_ms": 5, "retries": 5, "max_in_flight_requests_per_connection": 1}
    opts.update(kw)
    opts.setdefault("enable_idempotence", s.kafka.idempotence and opts["acks"] in ("all", -1))
    return opts


def producer(settings: Settings | None = None, **kw):
    from kafka import KafkaProducer

    return KafkaProducer(**client_config(settings), **producer_options(settings, **kw))
