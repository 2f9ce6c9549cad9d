"""The publish step: the Triton repository of the live model versions, written where the predictor reads it.

The InferenceService's predictor names one `storageUri` (s3://bucket/prefix); KServe's storage initializer
downloads everything under it into /mnt/models and Triton serves that folder. Model versions are MLflow
registered-model versions (`<repo>/<model>/<V>/…`, rentalml.export.triton.write_triton_repo). Publish writes,
under that prefix, the repository holding exactly the versions the transformer may call after the deploy: the
one serving now (the InferenceService's `rentalml.io/model-version` label; its bundle comes from the registry)
and the new one, built from the bundles' ONNX files with the registry version numbers. Order: version folders
first, configs next, objects of versions no longer live last, so a pod starting mid-publish finds every folder
its configs need.

The python-backend twin of the repository (the tritonserver of the nvidia-pytriton wheel has only the python
backend) goes to `<parent>/python-twin/<basename>` beside the storageUri: not `<storageUri>-python`, because
kserve-storage lists objects with `Prefix=<path>` (no trailing slash, kserve_storage.py `_download_s3`), which
would pull that sibling into /mnt/models too.

Integrity: the bundles are checked against their checksums.json as the repository is written, and every version
folder of both repositories against the digests in its marker right before the upload (`verify_triton_checksums`):
a truncated or changed file stops the publish with PublishError naming it, before any object is written.

Object-store rules from kserve-storage 0.21.0 (`Storage._download_s3`): zero-byte objects and keys ending in `/`
are skipped, so a folder that must exist (an ensemble's version folder) carries a non-empty marker file.

Credentials: the environment, as the pipeline step gets them from the `rentalml-object-store` Secret
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, MLFLOW_S3_ENDPOINT_URL; AWS_ENDPOINT_URL wins when set, as in
kserve-storage). Kubernetes API calls (RBAC): get on serving.kserve.io/inferenceservices.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

#: marker written into every empty folder (object stores have no empty folders; kserve-storage skips 0 bytes)
MARKER = ".rentalml-keep"
MARKER_TEXT = b"kept by rentalml publish: object stores drop empty folders\n"
TWIN_DIR = "python-twin"
API_CALLS = (("get", "serving.kserve.io", "inferenceservices"),)


class PublishError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------ locations
def split_s3(uri: str) -> tuple[str, str]:
    p = urlparse(uri)
    if p.scheme != "s3" or not p.netloc:
        raise PublishError(f"publish writes to s3:// storage URIs (what KServe's storage initializer and the "
                           f"manifests use), got {uri!r}")
    return p.netloc, p.path.strip("/")


def twin_uri(storage_uri: str) -> str:
    """Where the python-backend twin of the repository at `storage_uri` goes: `<parent>/python-twin/<base>`."""
    bucket, key = split_s3(storage_uri)
    parent, _, base = key.rpartition("/")
    return f"s3://{bucket}/{parent + '/' if parent else ''}{TWIN_DIR}/{base}"


def s3_client():
    """boto3 S3 client from the environment (the object-store Secret's keys)."""
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
    return boto3.client("s3", endpoint_url=endpoint,
                        region_name=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
                        or "us-east-1")


# ------------------------------------------------------------------------------------------ repositories
def build_repos(bundles: dict[str, Path], work: Path, gpu: bool | None = None) -> dict[str, Path]:
    """The cluster repository holding every version of `bundles` ({registry version: bundle dir}), written by
    the export module (`<model>/<V>/…`, configs with the export's version policy and dims; `gpu`: KIND_GPU +
    TensorRT, default settings.export.triton_gpu), and its python twin. Folders that would be empty get a
    non-empty marker."""
    from rentalml.export import triton as t

    cluster = work / "cluster"
    for v in sorted(bundles, key=int):
        t.write_triton_repo(bundles[v], cluster, version=int(v), gpu=gpu)
    twin = Path(t.write_python_twin(cluster, work / "twin"))
    for repo in (cluster, twin):
        for d in sorted(repo.rglob("*")):
            if d.is_dir() and not any(d.iterdir()):
                (d / MARKER).write_bytes(MARKER_TEXT)
    return {"cluster": cluster, "twin": twin}


def check_repos(repos: dict[str, Path], kinds: list[str]) -> None:
    """PublishError naming every file of these repositories that differs from its version folder's checksums."""
    from rentalml.export.triton import verify_triton_checksums

    errors = [f"{kind}: {e}" for kind in kinds for e in verify_triton_checksums(repos[kind])]
    if errors:
        raise PublishError("refusing to publish: the Triton repository does not match its checksums: "
                           + "; ".join(errors))


# ------------------------------------------------------------------------------------------ upload
def upload_tree(local: Path, uri: str, client=None) -> dict:
    """Mirror `local` to the s3 prefix `uri`: version folders first, config.pbtxt files next, then the objects
    under the prefix that are not in `local` are deleted. Zero-byte files are refused (kserve-storage skips
    them, so the pod would miss them)."""
    client = client or s3_client()
    bucket, prefix = split_s3(uri)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    empty = [str(p.relative_to(local)) for p in files if p.stat().st_size == 0]
    if empty:
        raise PublishError(f"zero-byte files would be skipped by KServe's storage initializer: {empty}")
    keys = {f"{prefix}/{p.relative_to(local).as_posix()}": p for p in files}
    for key, path in sorted(keys.items(), key=lambda kv: (kv[1].name == "config.pbtxt", kv[0])):
        client.upload_file(str(path), bucket, key)
    stale = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        stale += [o["Key"] for o in page.get("Contents", []) if o["Key"] not in keys]
    for i in range(0, len(stale), 1000):
        client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in stale[i:i + 1000]]})
    return {"uri": uri, "objects": len(keys), "deleted": len(stale),
            "bytes": sum(p.stat().st_size for p in keys.values())}


def ensure_bucket(bucket: str, client=None) -> None:
    """Create the bucket only when the store says it does not exist (a 403 is left for the upload to report)."""
    from botocore.exceptions import ClientError

    client = client or s3_client()
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
            raise
        client.create_bucket(Bucket=bucket)


# ------------------------------------------------------------------------------------------ the step
def live_target(isvc_name: str, namespace: str | None, api=None) -> dict:
    """storageUri and the version serving now, read from the InferenceService in the cluster."""
    from rentalml import kserve

    api = api or kserve.custom_objects_api()
    ns = kserve.namespace_of(namespace)
    doc = kserve.get_isvc(api, ns, isvc_name)
    return {"storage_uri": doc["spec"]["predictor"]["model"]["storageUri"],
            "serving_version": (doc["metadata"].get("labels") or {}).get(kserve.VERSION_LABEL), "namespace": ns}


def publish(*, version: str, bundle_dir: str | Path, storage_uri: str, serving_version: str | None = None,
            fetch_bundle=None, client=None, twin: bool = True, gpu: bool | None = None) -> dict:
    """Write the repository of {serving_version, version} to `storage_uri` (and the twin beside it), built from
    the bundles (the new one here, the serving one from the registry: `fetch_bundle(version) -> Path`)."""
    version = str(version)
    bundles = {version: Path(bundle_dir)}
    if serving_version and str(serving_version) != version:
        if fetch_bundle is None:
            from rentalml.registry.mlflow_registry import fetch_bundle as fetch

            def fetch_bundle(v):
                return fetch(version=str(v))

        bundles[str(serving_version)] = Path(fetch_bundle(str(serving_version)))
    split_s3(storage_uri)
    client = client or s3_client()
    out: dict = {"versions": sorted(bundles, key=int), "storage_uri": storage_uri}
    work = Path(tempfile.mkdtemp(prefix="rentalml-publish-"))
    try:
        from rentalml.runtime.bundle import BundleIntegrityError

        try:
            repos = build_repos(bundles, work, gpu)
        except BundleIntegrityError as exc:
            raise PublishError(f"refusing to publish: {exc}") from None
        targets = [("cluster", storage_uri)] + ([("twin", twin_uri(storage_uri))] if twin else [])
        check_repos(repos, [kind for kind, _ in targets])
        for kind, uri in targets:
            ensure_bucket(split_s3(uri)[0], client)
            out[kind] = upload_tree(repos[kind], uri, client)
        out["twin_uri"] = twin_uri(storage_uri) if twin else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
