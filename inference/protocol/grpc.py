"""v2 over gRPC: the servicer (ModelInfer of our model answered by the model directly) and the server running it.

KServe 0.21 builds its grpc.aio server with fixed interceptors and servicer (`GRPCServer.start`); `install`
swaps in a subclass whose server runs the JWT interceptor first (inference/auth.py) and, for the fast path, the
`fast_servicer_class` below.
"""

from __future__ import annotations

GRPC_MAX_METADATA_BYTES = 64 * 1024


def fast_servicer_class(model):
    """KServe's gRPC InferenceServicer with ModelInfer of `model` answered by its preprocess → predict →
    postprocess (`RecommenderModel.infer`: the request validation and conversion KServe's servicer does, then no
    dataplane model lookup and no `Model.__call__`); other models, versions or a model that is not ready take
    KServe's path. Errors propagate to the server's interceptors exactly as before (InvalidInput →
    INVALID_ARGUMENT, timeout → DEADLINE_EXCEEDED)."""
    from kserve.protocol.grpc.servicer import InferenceServicer

    from .types import InferRequest

    class FastInferenceServicer(InferenceServicer):
        async def ModelInfer(self, request, context):  # noqa: N802 - the gRPC method name
            if request.model_name != model.name or request.model_version or not model.ready:
                return await super().ModelInfer(request, context)
            self.validate_grpc_request(request)
            response = await model.infer(InferRequest.from_grpc(request))
            return response.to_grpc()

    return FastInferenceServicer


def install(interceptor=None, fast_model=None) -> None:
    """Make KServe's ModelServer build our gRPC server: `interceptor` first (JWT on every method but
    ServerLive/ServerReady/ModelReady) and, with `fast_model`, `fast_servicer_class(fast_model)`. Neither:
    KServe's own server."""
    if interceptor is None and fast_model is None:
        return
    from concurrent import futures

    import kserve.model_server as ms
    from grpc import aio
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
    from kserve.protocol.grpc.server import GRPCServer
    from kserve.protocol.grpc.servicer import InferenceServicer

    servicer_class = InferenceServicer if fast_model is None else fast_servicer_class(fast_model)
    interceptors = (*((interceptor,) if interceptor is not None else ()), LoggingInterceptor(),
                    ExceptionToStatusInterceptor())

    class RentalGRPCServer(GRPCServer):
        async def start(self, max_workers):
            servicer = servicer_class(self._data_plane, self._model_repository_extension)
            self._server = aio.server(
                futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=interceptors,
                options=[("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                         ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length")),
                         # request metadata up to 64 KiB reaches the JWT interceptor, which refuses a token over
                         # auth.max_token_bytes (8 KiB) as UNAUTHENTICATED; gRPC's default soft limit (8 KiB)
                         # would answer RESOURCE_EXHAUSTED first. Over 64 KiB: RESOURCE_EXHAUSTED, always.
                         ("grpc.max_metadata_size", GRPC_MAX_METADATA_BYTES),
                         ("grpc.absolute_max_metadata_size", GRPC_MAX_METADATA_BYTES)])
            grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
            self._server.add_insecure_port(f"[::]:{self._port}")
            await self._server.start()
            await self._server.wait_for_termination()

    ms.GRPCServer = RentalGRPCServer
