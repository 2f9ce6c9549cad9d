"""A/B canary: sticky assignment, the statistics and decision, a real two-version server (tritonclient HTTP + gRPC),
outcome logging (file and a real Kafka broker), `rentalml ab report|promote|rollback` on a real MLflow registry and
cluster mode against a stand-in Kubernetes API server."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import httpx
import pytest

tritonclient = pytest.importorskip("tritonclient")
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from serving_helpers import Server, make_bundle, v2_infer, v2_params, warm_users  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from rentalml.config import Settings, get_settings  # noqa: E402
from rentalml.evaluation import ab  # noqa: E402
from rentalml.services import wait_until  # noqa: E402

SALT = "test-salt"


# ---- assignment --------------------------------------------------------------------------------------------
def test_assignment_split_and_stickiness():
    users = [f"u_{i:06d}" for i in range(10_000)]
    arms = [ab.assign_variant(u, SALT, 10) for u in users]
    share = arms.count("challenger") / len(users)
    assert abs(share - 0.10) <= 0.02, share  # 90/10 within ±2 %
    assert arms == [ab.assign_variant(u, SALT, 10) for u in users]  # the same user, the same arm
    # a bigger canary keeps everyone already in it (buckets below the threshold)
    wider = [ab.assign_variant(u, SALT, 25) for u in users]
    assert all(w == "challenger" for a, w in zip(arms, wider, strict=True) if a == "challenger")
    assert set(ab.assign_variant(u, SALT, 0) for u in users) == {"champion"}
    assert set(ab.assign_variant(u, SALT, 100) for u in users) == {"challenger"}
    other = [ab.assign_variant(u, "another-experiment", 10) for u in users]
    assert other != arms  # a new salt reshuffles


# ---- statistics (hand-computed references) -----------------------------------------------------------------
def test_wilson_interval_hand_computed():
    # p = 0.45, n = 100, z = 1.96: centre = (0.45 + 1.96²/200) / (1 + 1.96²/100) = 0.469208 / 1.038416
    # half = 1.96 * sqrt(0.45*0.55/100 + 1.96²/40000) / 1.038416 = 0.099383 / 1.038416
    lo, hi = ab.wilson_interval(45, 100)
    assert lo == pytest.approx(0.451850 - 0.095706, abs=2e-5)
    assert hi == pytest.approx(0.451850 + 0.095706, abs=2e-5)
    assert ab.wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = ab.wilson_interval(0, 50)  # no successes: lower bound 0, upper z²/(n+z²) = 3.8415/53.8415
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(3.841459 / 53.841459, abs=1e-6)


def test_two_proportion_z_test_hand_computed():
    # 100/1000 vs 130/1000: pooled 0.115, se = sqrt(0.115*0.885*2/1000) = 0.0142671, z = 0.03/se = 2.10274
    z, p = ab.two_proportion_z_test(100, 1000, 130, 1000)
    assert z == pytest.approx(2.10274, abs=1e-4)
    assert p == pytest.approx(0.035485, abs=1e-4)  # 2 * (1 - Φ(2.10274))
    z2, p2 = ab.two_proportion_z_test(130, 1000, 100, 1000)
    assert z2 == pytest.approx(-z) and p2 == pytest.approx(p)
    assert ab.two_proportion_z_test(0, 0, 1, 10) == (0.0, 1.0)


def _arm(name, impressions, clicks, saves=0):
    return ab.ArmStats(name, impressions=impressions, clicks=clicks, saves=saves)


def test_decision_rule():
    champ = _arm("champion", 1000, 100)
    better, worse, same = _arm("challenger", 1000, 130), _arm("challenger", 1000, 72), _arm("challenger", 1000, 104)
    assert ab.decide(champ, better)["decision"] == "promote"
    assert ab.decide(champ, worse)["decision"] == "rollback"
    d = ab.decide(champ, same)
    assert d["decision"] == "keep" and "no significant" in d["reason"]
    d = ab.decide(_arm("champion", 900, 90), _arm("challenger", 100, 40), min_impressions=1000)
    assert d["decision"] == "keep" and "not enough data" in d["reason"]
    d = ab.decide(champ, better, alpha=0.01)  # p = 0.035: significant at 5 %, not at 1 %
    assert d["decision"] == "keep"
    conv = ab.decide(_arm("champion", 2000, 0, saves=40), _arm("challenger", 2000, 0, saves=75), metric="conversion")
    assert conv["decision"] == "promote" and conv["relative_lift"] == pytest.approx(0.875)


def test_summarize_counts_and_dedup():
    ev = []
    for i in range(10):
        ev.append({"event_id": f"i{i}", "user_id": f"u{i % 3}", "variant": "champion", "model_version": "1",
                   "outcome": "impression"})
    ev += [{"event_id": "c1", "user_id": "u1", "variant": "champion", "model_version": "1", "outcome": "click"},
           {"event_id": "c1", "user_id": "u1", "variant": "champion", "model_version": "1", "outcome": "click"},
           {"event_id": "s1", "user_id": "u2", "variant": "champion", "model_version": "1", "outcome": "save"},
           {"event_id": "q1", "user_id": "u2", "variant": "champion", "model_version": "1", "outcome": "inquiry"}]
    arm = ab.summarize(ev)["champion"]
    assert (arm.impressions, arm.clicks, arm.conversions, arm.users) == (10, 1, 2, 3)
    d = arm.to_dict()
    assert d["ctr"] == 0.1 and d["conversion"] == 0.2 and d["model_versions"] == ["1"]
    assert d["ctr_ci95"][0] < 0.1 < d["ctr_ci95"][1]


# ---- a real server: champion v1 + challenger v2 at 50 % -----------------------------------------------------
@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("ab-bundles")
    return make_bundle(root / "v1", "1"), make_bundle(root / "v2", "2")


@pytest.fixture(scope="module")
def ab_server(bundles, tmp_path_factory):
    v1, v2 = bundles
    srv = Server(v1, tmp_path_factory.mktemp("ab-log") / "server.log", "--challenger-bundle", str(v2),
                 "--challenger-percent", "50", env={"RENTALML_SERVE__AB_SALT": SALT})
    try:
        srv.wait_ready()
        yield srv
    finally:
        rc = srv.stop()
    assert rc == 0, srv.log.read_text()[-3000:]


def _expected(u: str) -> tuple[str, str]:
    arm = ab.assign_variant(u, SALT, 50)
    return arm, "1" if arm == "champion" else "2"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_v2_responses_carry_sticky_variant_and_version(ab_server, bundles, protocol):
    grpc = protocol == "grpc"
    c = (grpcclient.InferenceServerClient(f"127.0.0.1:{ab_server.grpc_port}") if grpc else
         httpclient.InferenceServerClient(f"127.0.0.1:{ab_server.http_port}"))
    mod = grpcclient if grpc else httpclient
    users = warm_users(bundles[0])[:20] + [f"u_new_{i}" for i in range(10)]
    seen = set()
    for u in users:
        for _ in range(2):  # sticky: the same answer every time
            params = v2_params(v2_infer(c, mod, [u], k=3), grpc)
            assert (params["variant"], params["model_version"]) == _expected(u), u
        seen.add(params["variant"])
    assert seen == {"champion", "challenger"}
    # a batch mixing both arms reports each row's variant and version
    batch = users[:8]
    params = v2_params(v2_infer(c, mod, batch, k=3), grpc)
    exp = [_expected(u) for u in batch]
    if len({e[0] for e in exp}) > 1:
        assert params["variant"].split(",") == [e[0] for e in exp]
        assert params["model_version"].split(",") == [e[1] for e in exp]
    c.close()


def test_friendly_api_variant_feedback_and_outcome_log(ab_server, bundles, tmp_path):
    users = warm_users(bundles[0])[:12]
    served = {}
    for u in users:
        r = httpx.post(f"{ab_server.url}/predict", json={"user_id": u, "num_recommendations": 4})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["variant"], body["model_version"]) == _expected(u)
        assert r.headers["x-variant"] == body["variant"]
        served[u] = body
    u = users[0]
    pid = served[u]["recommendations"][0]["property_id"]
    r = httpx.post(f"{ab_server.url}/feedback", json={"user_id": u, "property_id": pid, "outcome": "click",
                                                       "request_id": served[u]["request_id"]})
    assert r.status_code == 202, r.text
    assert (r.json()["variant"], r.json()["model_version"]) == _expected(u)
    for bad, field in [({"user_id": u, "property_id": pid, "outcome": "purchase"}, "outcome"),
                       ({"user_id": u, "outcome": "save"}, "property_id"),
                       ({"user_id": "", "property_id": pid, "outcome": "save"}, "user_id")]:
        r = httpx.post(f"{ab_server.url}/feedback", json=bad)
        assert r.status_code == 422 and field in r.json()["error"], r.text
    # impressions (one per served item) and the click land in the JSONL log, in the contract's shape
    events = []

    def logged() -> bool:
        events[:] = ab.read_outcomes_file(ab_server.outcomes)
        return any(e["outcome"] == "click" for e in events) and sum(
            e["outcome"] == "impression" and e["user_id"] in served for e in events) >= 4 * len(users)

    with contextlib.suppress(TimeoutError):  # the asserts below say what is missing
        wait_until(logged, 10, interval=0.2, what="the impressions and the click in the outcome log")
    keys = {"event_id", "request_id", "user_id", "property_id", "variant", "model_version", "outcome", "timestamp"}
    assert events and all(set(e) == keys for e in events)
    mine = [e for e in events if e["user_id"] == u and e["outcome"] == "impression"
            and e["request_id"] == served[u]["request_id"]]
    assert [e["property_id"] for e in mine] == [x["property_id"] for x in served[u]["recommendations"]]
    click = [e for e in events if e["outcome"] == "click"]
    assert click[0]["request_id"] == served[u]["request_id"] and click[0]["variant"] == _expected(u)[0]
    # and `rentalml ab report` reads it
    from rentalml.cli import app

    res = CliRunner().invoke(app, ["ab", "report", "--outcomes", str(ab_server.outcomes), "--min-impressions", "1"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["decision"] in ("promote", "keep", "rollback") and set(rep["variants"]) >= {"champion"}
    assert rep["variants"][_expected(u)[0]]["clicks"] >= 1


def test_outcomes_to_kafka(bundles, kafka_bootstrap, tmp_path):
    # the server creates the ab_outcomes topic itself (configured partitions) before its first send
    srv = Server(bundles[0], tmp_path / "kafka.log", env={"RENTALML_SERVE__OUTCOMES_SINK": "kafka",
                                                          "RENTALML_SERVE__LOG_IMPRESSIONS": "always",
                                                          "RENTALML_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap})
    try:
        srv.wait_ready()
        r = httpx.post(f"{srv.url}/predict", json={"user_id": "u_kafka_test", "num_recommendations": 3})
        assert r.status_code == 200, r.text
        rid = r.json()["request_id"]
        r = httpx.post(f"{srv.url}/feedback", json={"user_id": "u_kafka_test", "outcome": "save",
                                                     "property_id": r.json()["recommendations"][0]["property_id"]})
        assert r.status_code == 202
        events = []

        def sent() -> bool:  # each read waits until the topic has been idle for 2 s
            events[:] = [e for e in ab.read_outcomes_kafka({"bootstrap_servers": kafka_bootstrap}, idle_s=2)
                         if e["user_id"] == "u_kafka_test"]
            return len(events) >= 4

        with contextlib.suppress(TimeoutError):  # the assert below shows what arrived
            wait_until(sent, 30, interval=0, what="4 outcomes in ab_outcomes")
        assert sorted(e["outcome"] for e in events) == ["impression"] * 3 + ["save"], events
        assert {e["request_id"] for e in events if e["outcome"] == "impression"} == {rid}
        assert not srv.outcomes.exists()  # nothing went to the file sink
    finally:
        assert srv.stop() == 0


# ---- promote / rollback on a real MLflow registry ------------------------------------------------------------
@pytest.fixture
def registry(tmp_path, bundles, monkeypatch):
    from rentalml.registry import mlflow_registry as reg

    monkeypatch.chdir(tmp_path)  # nothing MLflow writes may land in the repository
    monkeypatch.setenv("RENTALML_HOME", str(tmp_path))
    monkeypatch.setenv("RENTALML_MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    get_settings.cache_clear()
    s = get_settings()
    for bundle, ndcg in zip(bundles, (0.30, 0.20), strict=True):  # v1 champion, v2 (worse offline) challenger
        run = reg.log_training_run(model_type="hybrid", params={}, metrics={"ndcg@10": ndcg}, bundle_dir=bundle,
                                   settings=s)
        reg.register(run, settings=s)
    yield s
    get_settings.cache_clear()


def _aliases(s: Settings) -> tuple:
    from rentalml.registry import mlflow_registry as reg

    return reg.alias_version("champion", settings=s), reg.alias_version("challenger", settings=s)


def test_promote_and_rollback_move_aliases(registry, tmp_path, monkeypatch):
    from rentalml.cli import app

    runner = CliRunner()
    assert _aliases(registry) == ("1", "2")
    # stop the canary: the challenger alias goes, the champion stays
    res = runner.invoke(app, ["ab", "rollback"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["action"] == "canary_stopped" and _aliases(registry) == ("1", None)
    res = runner.invoke(app, ["ab", "promote"])
    assert res.exit_code == 2 and "nothing to promote" in res.output

    from rentalml.registry import mlflow_registry as reg

    reg.set_alias("challenger", "2", settings=registry)
    # cluster mode: the same alias moves plus a JSON Patch of the transformer's pinned arms, applied by a fake API
    # server with the API server's semantics for the content type sent, on the rendered InferenceService
    from rentalml.components import rendered as cl
    from rentalml.components.kubefake import FakeKubeApi

    from rentalml import kserve as ks

    isvc = cl.find(cl.render("dev", workdir=tmp_path / "render"), "InferenceService", "rental-recommender")
    with FakeKubeApi() as api:
        api.put(isvc, "ml")
        monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "kubeconfig", "ml")))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)

        def arms() -> dict:
            live = api.get("serving.kserve.io", "ml", "inferenceservices", "rental-recommender")
            env = {e["name"]: e.get("value") for e in live["spec"]["transformer"]["containers"][0]["env"]}
            others = {k: v for k, v in env.items() if k not in (ks.ENV_CHAMPION, ks.ENV_CHALLENGER, ks.ENV_PERCENT)}
            before = {e["name"]: e.get("value") for e in isvc["spec"]["transformer"]["containers"][0]["env"]}
            assert others == before  # every other env entry (auth included) kept
            return {k: env.get(k) for k in (ks.ENV_CHAMPION, ks.ENV_CHALLENGER, ks.ENV_PERCENT)}

        res = runner.invoke(app, ["ab", "promote", "--cluster", "--isvc", "rental-recommender", "--namespace", "ml"])
        assert res.exit_code == 0, res.output
        out = json.loads(res.output)
        assert out["champion"] == "2" and out["previous_champion"] == "1" and _aliases(registry) == ("2", None)
        assert arms() == {ks.ENV_CHAMPION: "2", ks.ENV_CHALLENGER: "", ks.ENV_PERCENT: "0"}
        assert all(p["content_type"].startswith("application/json-patch+json") for p in api.patches())
        # no canary left: rollback restores the previous champion (recorded at promotion), pinned in the cluster
        res = runner.invoke(app, ["ab", "rollback", "--cluster", "--namespace", "ml"])
        assert res.exit_code == 0, res.output
        out = json.loads(res.output)
        assert out["action"] == "champion_restored" and out["champion"] == "1" and _aliases(registry) == ("1", None)
        assert arms() == {ks.ENV_CHAMPION: "1", ks.ENV_CHALLENGER: "", ks.ENV_PERCENT: "0"}
        assert len(api.patches()) == 2
    # v1 has no recorded predecessor: nothing further to roll back to
    res = runner.invoke(app, ["ab", "rollback"])
    assert res.exit_code == 2 and "nothing to roll back" in res.output


def test_ab_report_cli_decisions(tmp_path):
    from rentalml.cli import app

    path = tmp_path / "outcomes.jsonl"
    lines = []
    for variant, clicks in (("champion", 100), ("challenger", 160)):
        for i in range(1000):
            lines.append({"event_id": f"{variant}-i{i}", "user_id": f"u{i % 200}", "variant": variant,
                          "model_version": "1" if variant == "champion" else "2", "outcome": "impression"})
        for i in range(clicks):
            lines.append({"event_id": f"{variant}-c{i}", "user_id": f"u{i % 200}", "variant": variant,
                          "model_version": "1" if variant == "champion" else "2", "outcome": "click"})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"truncated": ')
    res = CliRunner().invoke(app, ["ab", "report", "--outcomes", str(path)])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["decision"] == "promote" and rep["variants"]["challenger"]["ctr"] == 0.16
    z, p = ab.two_proportion_z_test(100, 1000, 160, 1000)
    assert rep["p_value"] == pytest.approx(p, abs=1e-6) and p < 0.001 and not math.isnan(z)
    res = CliRunner().invoke(app, ["ab", "report", "--outcomes", str(tmp_path / "missing.jsonl")])
    assert res.exit_code == 2
    res = CliRunner().invoke(app, ["ab", "report", "--outcomes", str(path), "--metric", "revenue"])
    assert res.exit_code != 0 and "--metric" in res.output


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="serve.outcomes_sink"):
        from rentalml.inference.outcomes import OutcomeLog

        OutcomeLog(Settings(), sink="s3")
    assert Path(ab.outcomes_path(Settings(home=Path("/tmp/x")))).name == "outcomes.jsonl"
