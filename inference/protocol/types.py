"""KServe's v2 protocol types, imported here once for every module of rentalml.inference.

Quirk: importing kserve runs argparse.parse_known_args() over sys.argv (kserve/model_server.py), so a caller's
own flags (e.g. `--workers 3`) would silently become ModelServer defaults. The first import of kserve in a
process happens here, with a bare argv.
"""

import sys

_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    import kserve
    from grpc_interceptor.exceptions import DeadlineExceeded
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse, RequestedOutput
finally:
    sys.argv = _argv

Model = kserve.Model

__all__ = ["DeadlineExceeded", "InferInput", "InferOutput", "InferRequest", "InferResponse", "InvalidInput", "Model",
           "RequestedOutput"]
