"""JWT bearer auth of `rentalml serve` (real server, tritonclient HTTP + gRPC, httpx) and the verifier (HS256/RS256).

Hostile tokens (issue 13, point 7) against each transport of a real server: REST (/predict, /admin/*), the v2 REST
fast path (tritonclient HTTP infer) and gRPC. Two servers: an HS256 shared secret, and a JWK Set of two RSA keys
with an audience and an issuer. The checks are PyJWT's own (jwt/api_jws.py `_verify_signature`: the algorithm
allow-list and a PyJWK bound to one algorithm; jwt/api_jwt.py `_validate_claims`: require, exp, nbf, iat, aud, iss
with leeway; PyJWT 2.15.1). RFC 8725 (JWT BCP) §2.1/§3.1 (alg none, key confusion), RFC 6750 §2.3 (no tokens
in the URL query).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time

import httpx
import jwt
import pytest

tritonclient = pytest.importorskip("tritonclient")
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from rentalml.inference.auth import AuthError, Verifier, is_open_path  # noqa: E402
from serving_helpers import MODEL, Server, make_bundle, v2_infer, warm_users  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from rentalml.config import AuthSettings  # noqa: E402

SECRET = "s3cret-for-tests-only-0123456789abcdef"


def token(secret=SECRET, alg="HS256", headers=None, **claims) -> str:
    return jwt.encode({"sub": "tester", "exp": int(time.time()) + 600, **claims}, secret, algorithm=alg,
                      headers=headers)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict, claims: dict, hmac_key: bytes | None) -> str:
    """A token PyJWT would refuse to make: `alg: none`, or HS256 with a PEM public key as the HMAC secret."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    sig = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest() if hmac_key else b""
    return f"{signing_input}.{_b64(sig)}"


def rsa_key():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, pem


def hostile(good_claims: dict, *, secret: str | None = None, pem: bytes | None = None, kid: str | None = None,
            signer=None, multi_key: bool = False) -> dict[str, str]:
    """case -> Authorization header value; every one must get 401 / UNAUTHENTICATED."""
    now = int(time.time())
    hdr = {"kid": kid} if kid else {}
    sign = signer or (lambda **c: token(secret, "HS256", **{**good_claims, **c}))
    cases = {
        "alg none": forge({"alg": "none", "typ": "JWT", **hdr}, {"sub": "x", "exp": now + 600, **good_claims}, None),
        "alg None": forge({"alg": "None", "typ": "JWT", **hdr}, {"sub": "x", "exp": now + 600, **good_claims}, None),
        "expired": sign(exp=now - 600),
        "not yet valid (nbf)": sign(nbf=now + 600),
        "issued in the future (iat)": sign(iat=now + 600),
        "no exp": forge({"alg": "HS256"}, {"sub": "x", **good_claims}, (secret or "x").encode()),
        "oversized": sign(pad="x" * 9000),
        "garbage": "not.a.jwt",
        "header not json": f"{_b64(b'{{{')}.{_b64(b'{}')}.",
        "payload a list": forge({"alg": "HS256"}, [1, 2], (secret or "x").encode()),  # type: ignore[arg-type]
    }
    if pem is not None:  # HS/RS confusion: HS256 signed with the RS256 public key (the PEM text) as secret
        cases["HS256 signed with the RS public key"] = forge({"alg": "HS256", "typ": "JWT", **hdr},
                                                             {"sub": "x", "exp": now + 600, **good_claims}, pem)
    if multi_key:
        cases["no kid, several keys"] = signer(no_kid=True)
        cases["unknown kid"] = signer(kid="who-is-this")
        cases["wrong audience"] = signer(aud="someone-else")
        cases["no audience"] = signer(aud=None)
        cases["wrong issuer"] = signer(iss="https://evil.example")
        cases["no issuer"] = signer(iss=None)
    return {k: f"Bearer {v}" for k, v in cases.items()}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("auth-bundle") / "bundle", "1")


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundle):
    root = tmp_path_factory.mktemp("auth")
    secret_file = root / "jwt-secret"
    secret_file.write_text(SECRET + "\n")
    srv = Server(bundle, root / "server.log", env={"RENTALML_AUTH__ENABLED": "true",
                                                   "RENTALML_AUTH__JWT_SECRET_FILE": str(secret_file)})
    srv.users = warm_users(bundle)[:2]
    try:
        srv.wait_ready()  # /v2/models/<m>/ready and gRPC ServerReady stay open (probes)
        yield srv
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-3000:]


BAD_TOKENS = {
    "missing": None,
    "not bearer": f"Basic {token()}",
    "wrong secret": f"Bearer {token(secret='another-secret-another-secret-0123')}",
    "expired": f"Bearer {token(exp=int(time.time()) - 60)}",
    "garbage": "Bearer not.a.jwt",
}


def _h(auth):
    return {"authorization": auth} if auth else {}


def test_health_and_metrics_stay_open(server):
    for path in ("/health", "/metrics", "/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready"):
        assert httpx.get(f"{server.url}{path}").status_code == 200, path


@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_friendly_api_needs_a_valid_token(server, case):
    body = {"user_id": server.users[0], "num_recommendations": 2}
    r = httpx.post(f"{server.url}/predict", json=body, headers=_h(BAD_TOKENS[case]))
    assert r.status_code == 401, r.text
    assert r.json()["error"].startswith("authorization:") and r.headers["www-authenticate"].startswith("Bearer")
    for path, payload in (("/feedback", {"user_id": "u", "property_id": "p", "outcome": "click"}),
                          ("/admin/reload", {}), ("/admin/invalidate", {"user_ids": ["u"]})):
        assert httpx.post(f"{server.url}{path}", json=payload, headers=_h(BAD_TOKENS[case])).status_code == 401
    for path in (f"/v2/models/{MODEL}", "/v2"):
        assert httpx.get(f"{server.url}{path}", headers=_h(BAD_TOKENS[case])).status_code == 401, path


def test_friendly_api_with_token(server):
    r = httpx.post(f"{server.url}/predict", json={"user_id": server.users[0], "num_recommendations": 2},
                   headers=_h(f"Bearer {token()}"))
    assert r.status_code == 200 and len(r.json()["recommendations"]) == 2
    r = httpx.get(f"{server.url}/v2/models/{MODEL}", headers=_h(f"Bearer {token()}"))
    assert r.status_code == 200 and r.json()["name"] == MODEL


def test_v2_rest_auth(server):
    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    assert c.is_server_ready()
    for case, auth in BAD_TOKENS.items():
        with pytest.raises(InferenceServerException) as err:
            v2_infer(c, httpclient, server.users, k=2, headers=_h(auth))
        assert err.value.status() == "401", case
        assert "authorization" in err.value.message()
    r = v2_infer(c, httpclient, server.users, k=2, headers=_h(f"Bearer {token()}"))
    assert r.as_numpy("property_id").shape == (2, 2)


def test_v2_grpc_auth(server):
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(MODEL)  # open: probes
    for case, auth in BAD_TOKENS.items():
        with pytest.raises(InferenceServerException) as err:
            v2_infer(c, grpcclient, server.users, k=2, headers=_h(auth))
        assert err.value.status() == "StatusCode.UNAUTHENTICATED", case
        assert "authorization" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        c.get_model_metadata(MODEL)
    assert err.value.status() == "StatusCode.UNAUTHENTICATED"
    good = _h(f"Bearer {token()}")
    assert c.get_model_metadata(MODEL, headers=good).name == MODEL
    r = v2_infer(c, grpcclient, server.users, k=2, headers=good)
    assert r.as_numpy("property_id").shape == (2, 2)


# ---- the verifier -----------------------------------------------------------------------------------------
def test_rs256_and_audience(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "pub.pem").write_bytes(pem)
    v = Verifier(AuthSettings(enabled=True, jwt_public_key_file=tmp_path / "pub.pem", audience="rentalml"))
    assert v.verify(f"Bearer {token(key, 'RS256', aud='rentalml')}")["sub"] == "tester"
    with pytest.raises(AuthError, match="(?i)audience"):
        v.verify(f"Bearer {token(key, 'RS256', aud='someone-else')}")
    # no HS256 key configured: an HMAC token (e.g. signed with the public key as secret) is refused
    with pytest.raises(AuthError, match="alg value is not allowed"):
        v.verify(f"Bearer {token(SECRET, 'HS256', aud='rentalml')}")
    with pytest.raises(AuthError, match="alg value is not allowed"):  # HS/RS confusion: the PEM as HMAC secret
        v.verify(f"Bearer {forge({'alg': 'HS256'}, {'aud': 'rentalml', 'exp': int(time.time()) + 60}, pem)}")
    # two key sources, neither with a kid: refused at start (several keys = a JWK Set with a kid each)
    with pytest.raises(ValueError, match="JWKS_FILE"):
        Verifier(AuthSettings(enabled=True, jwt_secret=SECRET, jwt_public_key_file=tmp_path / "pub.pem"))
    assert Verifier(AuthSettings(enabled=False)).problem(None) is None
    with pytest.raises(ValueError, match="JWT_SECRET_FILE"):
        Verifier(AuthSettings(enabled=True))


def test_open_paths():
    assert all(is_open_path(p) for p in ("/health", "/metrics", "/v2/health/ready", f"/v2/models/{MODEL}/ready"))
    assert not any(is_open_path(p) for p in ("/predict", "/feedback", "/admin/reload", f"/v2/models/{MODEL}/infer",
                                             f"/v2/models/{MODEL}", "/v2", "/v1/models/x:predict"))


# ---- hostile tokens against REST, the v2 REST fast path and gRPC --------------------------------------------
AUD, ISS = "rentalml-serving", "https://idp.rentalml.test/realms/rentalml"
KIDS = ("key-2026-11", "key-2026-12")


@pytest.fixture(scope="module")
def jwks_server(tmp_path_factory, bundle):
    """Several keys (a JWK Set of two RSA keys, rotation), an audience and an issuer."""
    from jwt.algorithms import RSAAlgorithm

    root = tmp_path_factory.mktemp("auth-jwks")
    keys = {kid: rsa_key() for kid in KIDS}
    jwks = {"keys": [{**json.loads(RSAAlgorithm.to_jwk(k.public_key())), "kid": kid, "alg": "RS256", "use": "sig"}
                     for kid, (k, _) in keys.items()]}
    (root / "jwks.json").write_text(json.dumps(jwks))
    srv = Server(bundle, root / "server.log", env={
        "RENTALML_AUTH__ENABLED": "true", "RENTALML_AUTH__JWKS_FILE": str(root / "jwks.json"),
        "RENTALML_AUTH__AUDIENCE": AUD, "RENTALML_AUTH__ISSUER": ISS})
    srv.users = warm_users(bundle)[:2]
    srv.keys = keys
    try:
        srv.wait_ready()
        yield srv
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-3000:]


def rs_signer(srv):
    def sign(kid: str = KIDS[1], no_kid: bool = False, **claims) -> str:
        body = {"sub": "tester", "exp": int(time.time()) + 600, "aud": AUD, "iss": ISS, **claims}
        body = {k: v for k, v in body.items() if v is not None}
        key = srv.keys.get(kid, srv.keys[KIDS[1]])[0]
        return jwt.encode(body, key, algorithm="RS256", headers=None if no_kid else {"kid": kid})
    return sign


def _status(srv, transport: str, auth: str | None, query: dict | None = None, admin: bool = False):
    """200 / 401 / 403 (gRPC codes mapped), or what else came back (a failure)."""
    if transport == "rest":
        if admin:
            r = httpx.post(f"{srv.url}/admin/invalidate", json={"user_ids": ["u"]}, headers=_h(auth), params=query)
        else:
            r = httpx.post(f"{srv.url}/predict", json={"user_id": srv.users[0], "num_recommendations": 2},
                           headers=_h(auth), params=query)
        return r.status_code
    module = httpclient if transport == "fastpath" else grpcclient
    port = srv.http_port if transport == "fastpath" else srv.grpc_port
    c = module.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        if admin:  # gRPC RepositoryModelLoad
            c.load_model(MODEL, headers=_h(auth))
        elif transport == "fastpath" and query:
            inp = httpclient.InferInput("user_id", [1], "BYTES")
            inp.set_data_from_numpy(__import__("numpy").array(srv.users[:1], dtype=object))
            c.infer(MODEL, [inp], headers=_h(auth), query_params=query)
        else:
            v2_infer(c, module, srv.users, k=2, headers=_h(auth))
        return 200
    except InferenceServerException as exc:
        code = {"StatusCode.UNAUTHENTICATED": 401, "StatusCode.PERMISSION_DENIED": 403}.get(str(exc.status()))
        return code or (int(exc.status()) if str(exc.status()).isdigit() else f"{exc.status()}: {exc.message()}")
    finally:
        c.close()


def _still_serving(srv, auth: str, since: int) -> None:
    """The process lives, every transport answers a valid token, and the log since `since` has no traceback."""
    assert srv.proc.poll() is None, srv.log.read_text()[-3000:]
    for transport in ("rest", "fastpath", "grpc"):
        assert _status(srv, transport, auth) == 200, transport
    log = srv.log.read_text()[since:]
    assert "Traceback" not in log and " 500 " not in log, log[-3000:]


TRANSPORTS = ("rest", "fastpath", "grpc")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_hostile_tokens_hs256(server, transport):
    since = len(server.log.read_text())
    cases = hostile({}, secret=SECRET)
    # the RS public key as HMAC secret is only meaningful where RS keys exist (the JWK Set server); here: a token
    # signed with an unrelated PEM key as the secret must still fail the HS256 signature check
    exp = {"exp": int(time.time()) + 600}
    cases["HS256 signed with a PEM text"] = f"Bearer {forge({'alg': 'HS256'}, exp, rsa_key()[1])}"
    got = {case: _status(server, transport, auth) for case, auth in cases.items()}
    assert got == dict.fromkeys(cases, 401), got
    _still_serving(server, f"Bearer {token()}", since)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_hostile_tokens_jwks(jwks_server, transport):
    since = len(jwks_server.log.read_text())
    sign = rs_signer(jwks_server)
    pem = jwks_server.keys[KIDS[1]][1]
    cases = hostile({"aud": AUD, "iss": ISS}, pem=pem, kid=KIDS[1], signer=sign, multi_key=True)
    good = {"exp": int(time.time()) + 600, "aud": AUD, "iss": ISS}
    cases["HS256 with the public key, no kid"] = f"Bearer {forge({'alg': 'HS256'}, good, pem)}"
    other_key = jwks_server.keys[KIDS[0]][0]
    cases["signed by key 1, named key 2"] = "Bearer " + jwt.encode(good, other_key, "RS256", headers={"kid": KIDS[1]})
    got = {case: _status(jwks_server, transport, auth) for case, auth in cases.items()}
    assert got == dict.fromkeys(cases, 401), got
    # both keys of the set verify their own tokens (rotation), an audience list containing ours is fine
    for kid in KIDS:
        assert _status(jwks_server, transport, f"Bearer {sign(kid=kid, aud=['other', AUD])}") == 200, kid
    _still_serving(jwks_server, f"Bearer {sign()}", since)


@pytest.mark.parametrize("transport", ("rest", "fastpath"))
def test_tokens_in_the_url_are_refused(server, transport):
    good = token()
    for name in ("access_token", "token", "ACCESS_TOKEN"):
        assert _status(server, transport, None, query={name: good}) == 401, name
        # even next to a valid header: the token has leaked into the URL (access logs), the client must change
        assert _status(server, transport, f"Bearer {good}", query={name: good}) == 401, name
    r = httpx.post(f"{server.url}/predict", params={"access_token": good},
                   json={"user_id": server.users[0], "num_recommendations": 2})
    assert "URL" in r.json()["error"]


def test_grpc_token_only_from_authorization_metadata(server):
    """gRPC has no URL: a token under any other metadata key is not looked at."""
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    for key in ("access_token", "token", "x-authorization"):
        with pytest.raises(InferenceServerException) as err:
            v2_infer(c, grpcclient, server.users, k=2, headers={key: f"Bearer {token()}"})
        assert err.value.status() == "StatusCode.UNAUTHENTICATED", key


@pytest.mark.parametrize("transport", ("rest", "grpc"))
def test_admin_needs_the_role(server, transport):
    """/admin/* and gRPC RepositoryModelLoad: any valid token is not enough (403 / PERMISSION_DENIED)."""
    assert _status(server, transport, f"Bearer {token()}", admin=True) == 403
    assert _status(server, transport, f"Bearer {token(roles=['viewer'])}", admin=True) == 403
    assert _status(server, transport, f"Bearer {token(roles='rentalml-admin-not')}", admin=True) == 403
    assert _status(server, transport, "Bearer not.a.jwt", admin=True) == 401
    admin = f"Bearer {token(roles=['viewer', 'rentalml-admin'])}"
    if transport == "rest":
        assert _status(server, transport, admin, admin=True) == 200
        r = httpx.post(f"{server.url}/admin/reload", headers=_h(f"Bearer {token()}"))
        assert r.status_code == 403 and "rentalml-admin" in r.json()["error"]
    else:  # past auth: KServe answers the load itself (whatever it is, not PERMISSION_DENIED / UNAUTHENTICATED)
        assert _status(server, transport, admin, admin=True) not in (401, 403)
    # a valid non-admin token still serves predictions
    assert _status(server, "rest", f"Bearer {token()}") == 200


def test_health_says_auth_is_on(server):
    assert httpx.get(f"{server.url}/health").json()["auth_enabled"] is True


def test_disabled_auth_is_loud(caplog):
    from rentalml.inference.auth import log_state

    with caplog.at_level(logging.INFO, logger="rentalml.inference.auth"):
        log_state(Verifier(AuthSettings(enabled=False)))
    assert any(r.levelno == logging.WARNING and "DISABLED" in r.message for r in caplog.records)


def test_verifier_settings(tmp_path):
    from jwt.algorithms import RSAAlgorithm

    with pytest.raises(ValueError, match="at least 32"):
        Verifier(AuthSettings(enabled=True, jwt_secret="short"))
    k1, _ = rsa_key()
    k2, _ = rsa_key()
    jwk = json.loads(RSAAlgorithm.to_jwk(k1.public_key()))
    (tmp_path / "nokid.json").write_text(json.dumps({"keys": [jwk, json.loads(RSAAlgorithm.to_jwk(k2.public_key()))]}))
    with pytest.raises(ValueError, match="kid"):
        Verifier(AuthSettings(enabled=True, jwks_file=tmp_path / "nokid.json"))
    (tmp_path / "one.json").write_text(json.dumps({"keys": [{**jwk, "kid": "only"}]}))
    one = Verifier(AuthSettings(enabled=True, jwks_file=tmp_path / "one.json"))
    assert one.verify(f"Bearer {token(k1, 'RS256')}")["sub"] == "tester"  # one key: kid optional
    # the size limit applies before any parsing; the roles claim may be a dotted path (Keycloak)
    v = Verifier(AuthSettings(enabled=True, jwt_secret=SECRET, max_token_bytes=100,
                              roles_claim="realm_access.roles"))
    with pytest.raises(AuthError, match="too large"):
        v.verify("Bearer " + "a" * 200)
    v = Verifier(AuthSettings(enabled=True, jwt_secret=SECRET, roles_claim="realm_access.roles"))
    assert v.check(f"Bearer {token(realm_access={'roles': ['rentalml-admin']})}", admin=True) is None
    assert v.check(f"Bearer {token(roles=['rentalml-admin'])}", admin=True)[0] == 403
    # leeway: a token expired 10 s ago is fine with the default 30 s, not with 0
    assert v.problem(f"Bearer {token(exp=int(time.time()) - 10)}") is None
    strict = Verifier(AuthSettings(enabled=True, jwt_secret=SECRET, leeway_s=0))
    assert "expired" in strict.problem(f"Bearer {token(exp=int(time.time()) - 10)}")


def test_overlays_turn_auth_on(tmp_path):
    """dev and prod render the transformer with RENTALML_AUTH__ENABLED=true and a key (base sets both)."""
    import yaml
    from test_manifests import _copy_tree, _kustomize

    tree = _copy_tree(tmp_path)
    for overlay in ("dev", "prod"):
        res = _kustomize(tree / "manifests" / "overlays" / overlay)
        assert res.returncode == 0, res.stderr
        isvc = next(d for d in yaml.safe_load_all(res.stdout) if d and d["kind"] == "InferenceService")
        env = {e["name"]: e.get("value") for e in isvc["spec"]["transformer"]["containers"][0]["env"]}
        assert env["RENTALML_AUTH__ENABLED"] == "true", overlay
        assert env.get("RENTALML_AUTH__JWT_SECRET_FILE") or env.get("RENTALML_AUTH__JWKS_FILE"), overlay


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_huge_tokens_never_500(server, transport):
    """Past the transports' own header limits (h11/httptools, gRPC's 64 KiB metadata limit set by the server) the
    transport refuses: 401 up to 64 KiB, then 4xx / RESOURCE_EXHAUSTED, never 5xx; the server keeps serving.
    gRPC's limits: channel args grpc.max_metadata_size (soft, default 8 KiB) and grpc.absolute_max_metadata_size
    (hard) in grpc/grpc src/core/ext/transport/chttp2/transport/chttp2_transport.cc (grpcio 1.85.3 here: without
    the server's 64 KiB setting a 9 KiB token got "RESOURCE_EXHAUSTED: received metadata size exceeds soft limit
    (13104 vs. 8192)" instead of UNAUTHENTICATED)."""
    since = len(server.log.read_text())
    assert _status(server, transport, f"Bearer {token(pad='x' * 40_000)}") == 401
    got = _status(server, transport, f"Bearer {token(pad='x' * 200_000)}")
    assert got in (400, 401, 413, 431) or str(got).startswith("StatusCode.RESOURCE_EXHAUSTED"), got
    _still_serving(server, f"Bearer {token()}", since)
