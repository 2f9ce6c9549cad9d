"""Platform rule: every Kafka call the code makes in the cluster is allowed by its KafkaUser's ACLs, and every
topic it touches is a KafkaTopic (issue 11, defect 6).

The code runs (streaming.processor.Processor._connect, inference.outcomes.OutcomeLog's Kafka sink) against a
fake kafka-python whose broker authorizes each request as Kafka's simple authorizer would with the ACLs of the
rendered KafkaUsers, and lists only the topics of the rendered KafkaTopics. The component's principal is its
rendered container's RENTALML_KAFKA__SASL_USERNAME; its settings are built from that container's env.

Upstream rules the fake broker applies:
* Apache Kafka, docs/security.html ("Operations and Resources on Protocols"): Metadata needs Describe on the
  topic (a topic the principal may not Describe is left out of the response, so it looks missing);
  CreateTopics needs Create on the Cluster or the topic; Produce needs Write on the topic; Fetch and
  OffsetCommit need Read on the topic; ListOffsets and OffsetFetch need Describe on the topic;
  FindCoordinator and OffsetFetch need Describe on the group; JoinGroup, SyncGroup, Heartbeat, LeaveGroup and
  OffsetCommit need Read on the group.
* Apache Kafka, core/src/main/scala/kafka/server/KafkaApis.scala handleInitProducerIdRequest: an idempotent
  producer (kafka-python 3's default) needs IdempotentWrite on the Cluster or Write on any topic.
* Apache Kafka, metadata/src/main/java/org/apache/kafka/metadata/authorizer/StandardAuthorizerData.java:
  an ALLOW of Read, Write, Delete or Alter implies Describe; AlterConfigs implies DescribeConfigs; All
  implies everything; a matching DENY wins over any ALLOW.
* Strimzi 1.2.0, documentation/api/io.strimzi.api.kafka.model.user.acl.AclRule.adoc and
  api/src/main/java/io/strimzi/api/kafka/model/user/acl/{AclRule,AclRuleTopicResource}.java: resource types
  topic, group, cluster, transactionalId; `patternType` literal (the exact name, or `*` for all) or prefix
  (names starting with it), default literal; `type` allow (default) or deny; `host` default `*`. A pod's
  address is not known in advance, so only rules for host `*` grant anything here.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass

import kafka
import kafka.errors as kerr
import pytest
from test_manifests import rendered  # noqa: F401  (the module-scoped fixture: root, dev and prod rendered)

IMPLIES_DESCRIBE = {"Describe", "Read", "Write", "Delete", "Alter"}
IDEMPOTENT_BY_DEFAULT = kafka.KafkaProducer.DEFAULT_CONFIG["enable_idempotence"]  # True in kafka-python 3


# --- Strimzi ACL semantics -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    type: str  # allow | deny
    resource_type: str  # topic | group | cluster | transactionalId
    name: str | None
    pattern: str  # literal | prefix
    host: str
    operations: frozenset[str]

    def matches(self, resource_type: str, name: str | None) -> bool:
        if self.resource_type != resource_type:
            return False
        if resource_type == "cluster":
            return True
        if self.pattern == "prefix":
            return name.startswith(self.name)
        return self.name in ("*", name)


def rules_of(user: dict) -> list[Rule]:
    auth = user["spec"].get("authorization") or {}
    assert auth.get("type", "simple") == "simple", "only simple authorization is modelled"
    return [Rule(a.get("type", "allow"), a["resource"]["type"], a["resource"].get("name"),
                 a["resource"].get("patternType", "literal"), a.get("host", "*"), frozenset(a["operations"]))
            for a in auth.get("acls", [])]


def allowed(rules: list[Rule], resource_type: str, name: str | None, op: str) -> bool:
    matching = [r for r in rules if r.matches(resource_type, name)]
    if any(r.type == "deny" and (op in r.operations or "All" in r.operations) for r in matching):
        return False
    for r in matching:
        if r.type != "allow" or r.host != "*":
            continue
        if op in r.operations or "All" in r.operations:
            return True
        if op == "Describe" and r.operations & IMPLIES_DESCRIBE:
            return True
        if op == "DescribeConfigs" and "AlterConfigs" in r.operations:
            return True
    return False


def test_acl_semantics_follow_strimzi_and_kafka():
    acls = rules_of({"spec": {"authorization": {"type": "simple", "acls": [
        {"resource": {"type": "topic", "name": "in_", "patternType": "prefix"}, "operations": ["Read"]},
        {"resource": {"type": "topic", "name": "out"}, "operations": ["Write"], "host": "10.0.0.1"},
        {"resource": {"type": "topic", "name": "*"}, "operations": ["DescribeConfigs"]},
        {"resource": {"type": "group", "name": "g"}, "operations": ["All"]},
        {"type": "deny", "resource": {"type": "group", "name": "g-"}, "operations": ["Read"]},
        {"resource": {"type": "group", "name": "g-", "patternType": "prefix"}, "operations": ["Read"]},
    ]}}})
    assert allowed(acls, "topic", "in_x", "Read") and allowed(acls, "topic", "in_x", "Describe")  # implied
    assert not allowed(acls, "topic", "in", "Read")  # prefix "in_" does not match "in"
    assert not allowed(acls, "topic", "out", "Write")  # only from one host
    assert allowed(acls, "topic", "anything", "DescribeConfigs") and not allowed(acls, "topic", "x", "Describe")
    assert allowed(acls, "group", "g", "Describe") and not allowed(acls, "group", "gx", "Read")  # literal
    assert allowed(acls, "group", "g-1", "Read") and not allowed(acls, "group", "g-", "Read")  # deny wins
    assert not allowed(acls, "cluster", None, "Create")


# --- a fake kafka-python whose broker authorizes like Kafka --------------------------------------------------------

class Broker:
    """The cluster as the rendered manifests make it: topics = the KafkaTopics, principals = the KafkaUsers."""

    def __init__(self, docs: list[dict]):
        self.topics = {t["spec"].get("topicName", t["metadata"]["name"]) for t in docs if t["kind"] == "KafkaTopic"}
        self.users = {u["metadata"]["name"]: rules_of(u) for u in docs if u["kind"] == "KafkaUser"}
        self.calls: list[tuple[str, str, str, str | None]] = []  # (principal, op, resource type, name)
        self.denied: list[tuple[str, str, str, str | None]] = []
        self.sent: list[tuple[str, str]] = []

    def authorize(self, principal: str, op: str, resource_type: str, name: str | None, probe: bool = False) -> bool:
        """probe: a check whose failure only filters (Metadata for all topics leaves out the hidden ones; an
        idempotent producer looks for any topic it may Write), not a denied request."""
        self.calls.append((principal, op, resource_type, name))
        ok = principal in self.users and allowed(self.users[principal], resource_type, name, op)
        if not ok and not probe:
            self.denied.append((principal, op, resource_type, name))
        return ok

    def require(self, principal, op, resource_type, name, error):
        if not self.authorize(principal, op, resource_type, name):
            raise error(f"{principal}: {op} on {resource_type} {name}")

    def fakes(self):
        broker = self

        def principal_of(kw):
            return kw.get("sasl_plain_username") or "ANONYMOUS"

        class Admin:
            def __init__(self, **kw):
                self.principal = principal_of(kw)

            def list_topics(self):  # Metadata: only the topics the principal may Describe
                return sorted(t for t in broker.topics
                              if broker.authorize(self.principal, "Describe", "topic", t, probe=True))

            def create_topics(self, new_topics, **kw):
                for t in new_topics:
                    name = getattr(t, "name", t)
                    if not (broker.authorize(self.principal, "Create", "cluster", None, probe=True)
                            or broker.authorize(self.principal, "Create", "topic", name)):
                        raise kerr.TopicAuthorizationFailedError(name)
                    if name in broker.topics:
                        raise kerr.TopicAlreadyExistsError(name)
                    broker.topics.add(name)

            def close(self):
                pass

        class Consumer:
            def __init__(self, *topics, **kw):
                self.principal = principal_of(kw)
                group = kw.get("group_id")
                for t in topics:  # subscribe: Metadata, then Fetch / ListOffsets / OffsetFetch / OffsetCommit
                    broker.require(self.principal, "Describe", "topic", t, kerr.TopicAuthorizationFailedError)
                    broker.require(self.principal, "Read", "topic", t, kerr.TopicAuthorizationFailedError)
                if group is not None:  # FindCoordinator, OffsetFetch (Describe); Join/Sync/Heartbeat/Commit (Read)
                    broker.require(self.principal, "Describe", "group", group, kerr.GroupAuthorizationFailedError)
                    broker.require(self.principal, "Read", "group", group, kerr.GroupAuthorizationFailedError)
                self.topics, self.group = topics, group

            def close(self, *a, **kw):
                pass

        class Producer:
            def __init__(self, **kw):
                self.principal = principal_of(kw)
                if kw.get("enable_idempotence", IDEMPOTENT_BY_DEFAULT) \
                        and kw.get("acks", "all") in ("all", -1):
                    # InitProducerId: IdempotentWrite on the cluster, or Write on any topic
                    if not (broker.authorize(self.principal, "IdempotentWrite", "cluster", None, probe=True)
                            or any(broker.authorize(self.principal, "Write", "topic", t, probe=True)
                                   for t in broker.topics)):
                        broker.denied.append((self.principal, "IdempotentWrite", "cluster", None))
                        raise kerr.ClusterAuthorizationFailedError("InitProducerId")

            def send(self, topic, *a, **kw):
                broker.require(self.principal, "Describe", "topic", topic, kerr.TopicAuthorizationFailedError)
                broker.require(self.principal, "Write", "topic", topic, kerr.TopicAuthorizationFailedError)
                broker.sent.append((self.principal, topic))

            def flush(self, *a, **kw):
                pass

            def close(self, *a, **kw):
                pass

        return Admin, Consumer, Producer


@pytest.fixture
def fake_kafka(monkeypatch):
    def install(docs):
        broker = Broker(docs)
        admin, consumer, producer = broker.fakes()
        monkeypatch.setattr(kafka, "KafkaAdminClient", admin)
        monkeypatch.setattr(kafka, "KafkaConsumer", consumer)
        monkeypatch.setattr(kafka, "KafkaProducer", producer)
        return broker
    return install


# --- the components as rendered --------------------------------------------------------------------------------------

def _container(docs: list[dict], kind: str, name: str, container: str) -> dict:
    obj = next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)
    if kind == "InferenceService":
        containers = obj["spec"]["transformer"]["containers"]
    else:
        containers = obj["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == container)


def _settings(container: dict, monkeypatch):
    """The code's Settings as the container gets them: its literal env (the secrets' values do not matter
    here: the SASL password only authenticates, and the Redis/database URLs are not used by these paths)."""
    from rentalml.config import Settings

    for e in container.get("env", []):
        if "value" in e:
            monkeypatch.setenv(e["name"], e["value"])
    monkeypatch.setenv("RENTALML_HOME", "/tmp/rentalml-kafka-acl-test")
    return Settings()


COMPONENTS = {  # component -> (kind, name, container) of its rendered workload
    "stream processor": ("Deployment", "rentalml-stream-processor", "stream-processor"),
    "serving outcome log": ("InferenceService", "rental-recommender", "kserve-container"),
}


def _run_processor(settings):
    from rentalml.streaming.processor import Processor

    proc = Processor(settings, sink=object(), state=object(), log_fn=lambda doc: None)
    proc.topic_retry_s = 0.05
    stop = threading.Timer(2.0, proc.request_stop)  # where topics stay unavailable, _connect waits until stopped
    stop.start()
    try:
        proc._connect()
    finally:
        stop.cancel()
    return proc


def _run_outcomes(settings):
    from inference.outcomes import OutcomeLog

    log = OutcomeLog(settings)  # the sink the rendered env configures
    log._write([{"user_id": "u1", "event": "impression"}])
    return log


@pytest.mark.parametrize("target", ["root", "dev", "prod"])
def test_every_kafka_call_of_the_code_is_allowed_by_its_kafkauser(rendered, target, fake_kafka, monkeypatch):  # noqa: F811
    """Runs the processor's startup (topic check, consumer group join, producer) and the serving outcome log's
    Kafka write against the rendered cluster's ACLs: nothing may be denied and everything must complete."""
    from rentalml.streaming import processor

    from inference import outcomes
    from rentalml.kafka import processor_access

    docs = rendered[target]
    broker = fake_kafka(docs)
    problems = []
    # the stream processor
    settings = _settings(_container(docs, *COMPONENTS["stream processor"]), monkeypatch)
    principal = settings.kafka.sasl_username
    assert principal in broker.users, f"no KafkaUser {principal} for the stream processor"
    proc = _run_processor(settings)
    access = processor_access(settings)
    assert proc.consumer is not None, f"the processor never got its topics: denied {broker.denied}"
    assert set(proc.consumer.topics) == set(access.consumes) and proc.consumer.group == access.group
    assert {processor.PROCESSED_DATA, processor.DEAD_LETTER} == set(access.produces)  # what process() sends to
    for t in access.produces:  # Produce
        for op in ("Describe", "Write"):
            if not broker.authorize(principal, op, "topic", t):
                problems.append(f"stream processor ({principal}): {op} on topic {t}")
    # the serving outcome log (the transformer holds the rentalml-serving credentials for it)
    settings = _settings(_container(docs, *COMPONENTS["serving outcome log"]), monkeypatch)
    assert settings.kafka.sasl_username in broker.users, "no KafkaUser for the serving outcome log"
    assert settings.serve.outcomes_sink == "kafka", "in the cluster the outcomes go to ab_outcomes, not a pod file"
    log = _run_outcomes(settings)
    if log.dropped:
        problems.append(f"serving outcome log ({settings.kafka.sasl_username}): events dropped")
    assert (settings.kafka.sasl_username, outcomes.TOPIC) in broker.sent or problems
    problems += [f"denied: {d}" for d in broker.denied if d[1] != "Create"]
    assert not [d for d in broker.denied if d[1] == "Create"], "the code tried to create a topic in the cluster"
    assert not problems, "\n".join(problems)
    # least privilege: every operation an ACL grants is one the code performed
    for name, rules in broker.users.items():
        for r in rules:
            for op in r.operations:
                assert any(p == name and o == op and r.matches(t, n) for p, o, t, n in broker.calls), \
                    f"KafkaUser {name} grants {op} on {r.resource_type} {r.name} ({r.pattern}), which no code uses"


def test_every_topic_the_code_touches_is_a_kafkatopic(rendered):  # noqa: F811
    from inference import outcomes
    from rentalml.config import Settings
    from rentalml.kafka import TOPICS, processor_access

    touched = set(TOPICS) | set(processor_access(Settings()).topics) | {outcomes.TOPIC}
    for target, docs in rendered.items():
        topics = {t["spec"].get("topicName", t["metadata"]["name"]) for t in docs if t["kind"] == "KafkaTopic"}
        assert touched <= topics, (target, touched - topics)


def test_the_processor_waits_with_a_clear_error_where_a_topic_is_hidden(rendered, fake_kafka, monkeypatch,  # noqa: F811
                                                                        caplog):
    """Without Describe on one of its topics the processor neither creates it nor crash-loops: it logs which
    topics, which principal and the fix, and retries until stopped."""
    docs = copy.deepcopy(rendered["root"])
    user = next(d for d in docs if d["kind"] == "KafkaUser" and d["metadata"]["name"] == "rentalml-stream")
    user["spec"]["authorization"]["acls"] = [a for a in user["spec"]["authorization"]["acls"]
                                             if a["resource"].get("name") != "dead_letter"]
    broker = fake_kafka(docs)
    settings = _settings(_container(docs, *COMPONENTS["stream processor"]), monkeypatch)
    with caplog.at_level(logging.ERROR):
        proc = _run_processor(settings)
    assert proc.consumer is None and proc.stopping
    text = caplog.text
    assert "dead_letter" in text and "rentalml-stream" in text and "KafkaTopic" in text and "Describe" in text
    assert ("rentalml-stream", "Create", "topic", "dead_letter") in broker.denied  # tried, refused, reported


def test_topics_unavailable_from_ensure_topics(rendered, fake_kafka):  # noqa: F811
    from rentalml.config import Settings
    from rentalml.kafka import TopicsUnavailable, ensure_topics

    fake_kafka(rendered["root"])
    settings = Settings(kafka={"sasl_username": "rentalml-serving", "sasl_mechanism": "SCRAM-SHA-512",
                               "sasl_password": "x", "security_protocol": "SASL_PLAINTEXT"})
    with pytest.raises(TopicsUnavailable, match=r"\['processed_data'\].*rentalml-serving"):
        ensure_topics(settings, ("ab_outcomes", "processed_data"))
    assert ensure_topics(settings, ("ab_outcomes",)) == []
