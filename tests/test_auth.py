"""JWT bearer auth of `rentalml serve` (real server, tritonclient HTTP + gRPC, httpx) and the verifier (HS256/RS256)."""

from __future__ import annotations

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


def token(secret=SECRET, alg="HS256", **claims) -> str:
    return jwt.encode({"sub": "tester", "exp": int(time.time()) + 600, **claims}, secret, algorithm=alg)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    bundle = make_bundle(root / "bundle", "1")
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
    with pytest.raises(AuthError, match="not accepted"):
        v.verify(f"Bearer {token(SECRET, 'HS256', aud='rentalml')}")
    both = Verifier(AuthSettings(enabled=True, jwt_secret=SECRET, jwt_public_key_file=tmp_path / "pub.pem"))
    assert both.problem(f"Bearer {token()}") is None and both.problem(f"Bearer {token(key, 'RS256')}") is None
    assert Verifier(AuthSettings(enabled=False)).problem(None) is None
    with pytest.raises(ValueError, match="JWT_SECRET_FILE"):
        Verifier(AuthSettings(enabled=True))


def test_open_paths():
    assert all(is_open_path(p) for p in ("/health", "/metrics", "/v2/health/ready", f"/v2/models/{MODEL}/ready"))
    assert not any(is_open_path(p) for p in ("/predict", "/feedback", "/admin/reload", f"/v2/models/{MODEL}/infer",
                                             f"/v2/models/{MODEL}", "/v2", "/v1/models/x:predict"))
