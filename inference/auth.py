"""Optional JWT bearer authentication of the serving API (settings.auth).

Keys, exactly one source:
* `auth.jwt_secret_file` (or `auth.jwt_secret` from the environment): an HMAC secret (HS256/384/512), ≥ 32 bytes;
* `auth.jwt_public_key_file`: an RSA public key, PEM (RS256/384/512);
* `auth.jwks_file`: a JWK Set (`{"keys": [...]}`, what an IdP publishes at its jwks_uri; mount it from a
  ConfigMap), for several keys (rotation). Each key verifies one algorithm (its `alg`, else PyJWT's default for
  its type). With more than one key a token must name its key (`kid` header): one without `kid` is refused,
  never tried against each key in turn.

A token is accepted when its `alg` is one its key verifies and is in `auth.algorithms` (PyJWT's allow-list: `none`
and HS/RS confusion, e.g. an HS256 token signed with the RS256 public key as the secret, never verify), its
signature verifies, it carries the claims of `auth.require` (default `exp`), it is neither expired nor
not yet valid (`exp`, `nbf`, `iat` within `auth.leeway_s`), and — when set — `aud` contains `auth.audience` and
`iss` is `auth.issuer`. All of these are PyJWT's own checks (`jwt.decode`). Before any parsing, a token longer
than `auth.max_token_bytes` (8 KiB) is refused, and a token in the URL query (`?access_token=…`, RFC 6750 §2.3;
URLs end up in access logs) is refused even when a header is sent too.

Protected (401 / UNAUTHENTICATED without a valid token): POST /predict, /explain, /feedback, /admin/*, every /v1/*
and /v2/* route except /v2/health/* and /v2/models/<m>/ready (REST, `Authorization: Bearer <token>`), and every
gRPC method except ServerLive, ServerReady, ModelReady (gRPC metadata `authorization: Bearer <token>`). Admin
(403 / PERMISSION_DENIED unless the claim `auth.roles_claim` (default `roles`; a dotted path such as
`realm_access.roles` for Keycloak) contains `auth.admin_role` (default `rentalml-admin`)): REST /admin/*, gRPC
RepositoryModelLoad / RepositoryModelUnload. Open: /health, /metrics, /v2/health/*, /v2/models/<m>/ready (probes).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

from rentalml.config import AuthSettings, get_settings

log = logging.getLogger(__name__)

HMAC_ALGS = {"HS256", "HS384", "HS512"}
RSA_ALGS = {"RS256", "RS384", "RS512"}
MIN_SECRET_BYTES = 32  # RFC 7518 §3.2: an HS256 key of at least the hash size
OPEN_PATHS = ("/health", "/metrics", "/v2/health/", "/v2/health")
GRPC_OPEN_METHODS = {"ServerLive", "ServerReady", "ModelReady"}
GRPC_ADMIN_METHODS = {"RepositoryModelLoad", "RepositoryModelUnload"}
URL_TOKEN_PARAMS = {"access_token", "token", "id_token", "jwt", "authorization", "bearer"}


class AuthError(Exception):
    """A request without a valid token (401 / UNAUTHENTICATED)."""


class Forbidden(Exception):
    """A valid token without the role an admin route needs (403 / PERMISSION_DENIED)."""


@dataclass(frozen=True)
class _Key:
    kid: str | None
    algorithms: tuple[str, ...]
    key: object  # str (HMAC secret, PEM) or jwt.PyJWK


class Verifier:
    def __init__(self, settings: AuthSettings | None = None):
        s = settings or get_settings().auth
        self.settings = s
        self.enabled = bool(s.enabled)
        self.audience = s.audience
        self.issuer = s.issuer
        self.keys: list[_Key] = []
        if not self.enabled:
            return
        allowed = [a for a in s.algorithms if a.lower() != "none"]
        secret = Path(s.jwt_secret_file).read_text().strip() if s.jwt_secret_file else s.jwt_secret
        sources = [n for n, v in (("jwt_secret(_file)", secret), ("jwt_public_key_file", s.jwt_public_key_file),
                                  ("jwks_file", s.jwks_file)) if v]
        if len(sources) > 1:
            raise ValueError(f"auth: several key sources set ({', '.join(sources)}): give several keys as one JWK "
                             "Set (RENTALML_AUTH__JWKS_FILE), each with a `kid` (an `oct` key carries an HMAC secret)")
        if secret:
            if len(secret.encode()) < MIN_SECRET_BYTES:
                raise ValueError(f"auth: the HMAC secret has {len(secret.encode())} bytes; use at least "
                                 f"{MIN_SECRET_BYTES} random bytes")
            self._add(None, tuple(a for a in allowed if a in HMAC_ALGS), secret)
        if s.jwt_public_key_file:
            self._add(None, tuple(a for a in allowed if a in RSA_ALGS), Path(s.jwt_public_key_file).read_text())
        if s.jwks_file:
            self._load_jwks(Path(s.jwks_file), allowed)
        if not self.keys:
            raise ValueError("auth.enabled is set but no key matches auth.algorithms: set "
                             "RENTALML_AUTH__JWT_SECRET_FILE (HS256), RENTALML_AUTH__JWT_PUBLIC_KEY_FILE (RS256) or "
                             "RENTALML_AUTH__JWKS_FILE (a JWK Set)")
        if len(self.keys) > 1 and any(k.kid is None for k in self.keys):
            raise ValueError("auth: every key of a JWK Set with several keys needs a `kid`")
        self.by_kid = {k.kid: k for k in self.keys if k.kid is not None}

    def _add(self, kid, algorithms, key) -> None:
        if algorithms:
            self.keys.append(_Key(kid, algorithms, key))

    def _load_jwks(self, path: Path, allowed: list[str]) -> None:
        import jwt

        try:
            keys = jwt.PyJWKSet.from_dict(json.loads(path.read_text())).keys
        except (ValueError, jwt.PyJWTError) as exc:
            raise ValueError(f"auth.jwks_file {path}: not a usable JWK Set: {exc}") from None
        for k in keys:
            if k.algorithm_name not in allowed:
                log.warning("auth: JWK %r (%s) skipped: not in auth.algorithms %s", k.key_id, k.algorithm_name,
                            allowed)
                continue
            if k.Algorithm.__class__.__name__ == "HMACAlgorithm" and len(k.key) < MIN_SECRET_BYTES:
                raise ValueError(f"auth.jwks_file: oct key {k.key_id!r} is shorter than {MIN_SECRET_BYTES} bytes")
            self._add(k.key_id, (k.algorithm_name,), k)

    def describe(self) -> str:
        return ", ".join(f"{k.kid or '-'}:{'/'.join(k.algorithms)}" for k in self.keys)

    def _key_for(self, token: str) -> _Key:
        import jwt

        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        if kid is None:
            if len(self.keys) > 1:
                raise AuthError(f"invalid token: no `kid` header, and {len(self.keys)} keys are configured: "
                                "the token must name its key")
            return self.keys[0]
        if not isinstance(kid, str) or kid not in self.by_kid:
            if len(self.keys) == 1 and self.keys[0].kid is None:
                return self.keys[0]  # one key without a kid of its own: the token's kid is informational
            raise AuthError(f"invalid token: unknown key id {str(kid)[:64]!r}")
        return self.by_kid[kid]

    def verify(self, authorization: str | None) -> dict:
        """The token's claims, or AuthError saying what is wrong."""
        import jwt

        if not authorization:
            raise AuthError("missing bearer token: send 'Authorization: Bearer <JWT>'")
        if len(authorization) > self.settings.max_token_bytes:
            raise AuthError(f"token too large ({len(authorization)} bytes > {self.settings.max_token_bytes})")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("malformed Authorization header: expected 'Bearer <JWT>'")
        token = token.strip()
        key = self._key_for(token)
        require = list(dict.fromkeys([*self.settings.require, *(["aud"] if self.audience else []),
                                      *(["iss"] if self.issuer else [])]))
        try:
            claims = jwt.decode(token, key.key, algorithms=list(key.algorithms), audience=self.audience,
                                issuer=self.issuer, leeway=self.settings.leeway_s,
                                options={"require": require, "verify_aud": self.audience is not None,
                                         "verify_iss": self.issuer is not None})
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        except Exception as exc:  # a hostile token must never become a 500: whatever breaks is a 401
            log.warning("auth: token refused by an unexpected %s: %s", type(exc).__name__, exc)
            raise AuthError("invalid token") from None
        if not isinstance(claims, dict):
            raise AuthError("invalid token: the payload is not a JSON object")
        return claims

    def roles(self, claims: dict) -> set[str]:
        value: object = claims
        for part in self.settings.roles_claim.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str):
            return set(value.split())
        if isinstance(value, list):
            return {r for r in value if isinstance(r, str)}
        return set()

    def check(self, authorization: str | None, admin: bool = False) -> tuple[int, str] | None:
        """None when the request may go on, else (401 | 403, what is wrong)."""
        if not self.enabled:
            return None
        try:
            claims = self.verify(authorization)
        except AuthError as exc:
            return 401, str(exc)
        if admin and self.settings.admin_role not in self.roles(claims):
            return 403, (f"this endpoint needs the role {self.settings.admin_role!r} in the token's "
                         f"{self.settings.roles_claim!r} claim")
        return None

    def problem(self, authorization: str | None) -> str | None:
        refused = self.check(authorization)
        return None if refused is None else refused[1]


def is_open_path(path: str) -> bool:
    if path in ("/", "/health", "/metrics") or path.startswith("/v2/health"):
        return True
    if path.startswith("/v2/models/") and path.endswith("/ready"):  # readiness probes (gRPC ModelReady too)
        return True
    return not (path.startswith(("/v1/", "/v2/", "/admin/")) or path in ("/predict", "/explain", "/feedback", "/v2"))


def is_admin_path(path: str) -> bool:
    return path.startswith("/admin/") or path == "/admin"


def token_in_query(query: bytes) -> bool:
    try:
        return any(k.lower() in URL_TOKEN_PARAMS for k, _ in parse_qsl(query.decode("latin-1"),
                                                                       keep_blank_values=True))
    except ValueError:
        return False


class JWTMiddleware:
    """ASGI middleware in front of everything (the v2 fast path included): 401 (JSON error naming the problem,
    WWW-Authenticate: Bearer) or 403 (admin route without the role) on protected paths."""

    def __init__(self, app, verifier: Verifier):
        self.app = app
        self.verifier = verifier

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not is_open_path(scope["path"]):
            if token_in_query(scope.get("query_string", b"")):
                refused = (401, "tokens are not accepted in the URL query (it ends up in access logs): send "
                                "'Authorization: Bearer <JWT>'")
            else:
                auth = None
                for k, v in scope["headers"]:
                    if k == b"authorization":
                        auth = v.decode("latin-1")
                        break
                refused = self.verifier.check(auth, admin=is_admin_path(scope["path"]))
            if refused is not None:
                from fastapi.responses import JSONResponse

                status, problem = refused
                headers = ({"WWW-Authenticate": 'Bearer error="invalid_token"'} if status == 401 else
                           {"WWW-Authenticate": 'Bearer error="insufficient_scope"'})
                resp = JSONResponse({"error": f"authorization: {problem}"}, status_code=status, headers=headers)
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def grpc_interceptor(verifier: Verifier):
    """A grpc.aio server interceptor answering UNAUTHENTICATED (no valid token) or PERMISSION_DENIED (model
    repository load/unload without the admin role) on protected methods."""
    import grpc
    from grpc.aio import ServerInterceptor

    class JWTInterceptor(ServerInterceptor):
        async def intercept_service(self, continuation, details):
            method = details.method.rsplit("/", 1)[-1]
            if method in GRPC_OPEN_METHODS:
                return await continuation(details)
            auth = None
            for k, v in details.invocation_metadata or ():
                if k == "authorization":
                    auth = v if isinstance(v, str) else v.decode("latin-1")
                    break
            refused = verifier.check(auth, admin=method in GRPC_ADMIN_METHODS)
            if refused is None:
                return await continuation(details)
            code = grpc.StatusCode.UNAUTHENTICATED if refused[0] == 401 else grpc.StatusCode.PERMISSION_DENIED

            async def deny(request, context):
                await context.abort(code, f"authorization: {refused[1]}")

            return grpc.unary_unary_rpc_method_handler(deny)

    return JWTInterceptor()


def log_state(verifier: Verifier) -> None:
    """One line at server start: a WARNING when auth is off (every route, /admin/* included, is open)."""
    if verifier.enabled:
        s = verifier.settings
        log.info("auth: JWT required (keys %s; audience %s, issuer %s; admin role %r in %r)", verifier.describe(),
                 s.audience or "-", s.issuer or "-", s.admin_role, s.roles_claim)
    else:
        log.warning("auth: DISABLED (RENTALML_AUTH__ENABLED is not true): every route, /admin/* included, is open "
                    "to anyone who can reach this port")
