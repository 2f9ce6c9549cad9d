"""Optional JWT bearer authentication of the serving API (settings.auth).

Keys: HS256 with a shared secret (`auth.jwt_secret_file`, or `auth.jwt_secret` from the environment),
RS256 with a public key (`auth.jwt_public_key_file`, PEM). A token is accepted when its signature verifies
with the key for its `alg` (only algorithms listed in `auth.algorithms` and for which a key is configured),
it has not expired, and — when `auth.audience` is set — its `aud` matches.

Protected: POST /predict, POST /explain, POST /feedback, /admin/*, every /v1/* and /v2/* route except /v2/health/*
and /v2/models/<m>/ready (REST, `Authorization: Bearer <token>`), and every gRPC method except ServerLive,
ServerReady, ModelReady (gRPC metadata `authorization: Bearer <token>`). Open: /health, /metrics, /v2/health/*,
/v2/models/<m>/ready (the probes).
"""

from __future__ import annotations

from pathlib import Path

from rentalml.config import AuthSettings, get_settings

HMAC_ALGS = {"HS256", "HS384", "HS512"}
RSA_ALGS = {"RS256", "RS384", "RS512"}
OPEN_PATHS = ("/health", "/metrics", "/v2/health/", "/v2/health")
GRPC_OPEN_METHODS = {"ServerLive", "ServerReady", "ModelReady"}


class AuthError(Exception):
    pass


class Verifier:
    def __init__(self, settings: AuthSettings | None = None):
        s = settings or get_settings().auth
        self.enabled = bool(s.enabled)
        self.audience = s.audience
        self.keys: dict[str, object] = {}
        if not self.enabled:
            return
        secret = Path(s.jwt_secret_file).read_text().strip() if s.jwt_secret_file else s.jwt_secret
        public = Path(s.jwt_public_key_file).read_text() if s.jwt_public_key_file else None
        for alg in s.algorithms:
            if alg in HMAC_ALGS and secret:
                self.keys[alg] = secret
            elif alg in RSA_ALGS and public:
                self.keys[alg] = public
        if not self.keys:
            raise ValueError("auth.enabled is set but no key matches auth.algorithms: set "
                             "RENTALML_AUTH__JWT_SECRET_FILE (HS256) or RENTALML_AUTH__JWT_PUBLIC_KEY_FILE (RS256)")

    def verify(self, authorization: str | None) -> dict:
        """The token's claims, or AuthError saying what is wrong."""
        import jwt

        if not authorization:
            raise AuthError("missing bearer token: send 'Authorization: Bearer <JWT>'")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("malformed Authorization header: expected 'Bearer <JWT>'")
        token = token.strip()
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        key = self.keys.get(alg)
        if key is None:
            raise AuthError(f"invalid token: algorithm {alg!r} is not accepted ({', '.join(sorted(self.keys))})")
        try:
            return jwt.decode(token, key, algorithms=[alg], audience=self.audience,
                              options={"verify_aud": self.audience is not None})
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None

    def problem(self, authorization: str | None) -> str | None:
        if not self.enabled:
            return None
        try:
            self.verify(authorization)
        except AuthError as exc:
            return str(exc)
        return None


def is_open_path(path: str) -> bool:
    if path in ("/", "/health", "/metrics") or path.startswith("/v2/health"):
        return True
    if path.startswith("/v2/models/") and path.endswith("/ready"):  # readiness probes (gRPC ModelReady too)
        return True
    return not (path.startswith(("/v1/", "/v2/", "/admin/")) or path in ("/predict", "/explain", "/feedback", "/v2"))


class JWTMiddleware:
    """ASGI middleware: 401 (JSON error naming the problem, WWW-Authenticate: Bearer) on protected paths."""

    def __init__(self, app, verifier: Verifier):
        self.app = app
        self.verifier = verifier

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not is_open_path(scope["path"]):
            auth = None
            for k, v in scope["headers"]:
                if k == b"authorization":
                    auth = v.decode("latin-1")
                    break
            problem = self.verifier.problem(auth)
            if problem is not None:
                from fastapi.responses import JSONResponse

                resp = JSONResponse({"error": f"authorization: {problem}"}, status_code=401,
                                    headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def grpc_interceptor(verifier: Verifier):
    """A grpc.aio server interceptor answering UNAUTHENTICATED on protected methods without a valid token."""
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
            problem = verifier.problem(auth)
            if problem is None:
                return await continuation(details)

            async def deny(request, context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"authorization: {problem}")

            return grpc.unary_unary_rpc_method_handler(deny)

    return JWTInterceptor()
