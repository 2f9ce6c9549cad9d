"""Corrupt or mismatched model bundles (issue 13, fault 5): every bundle carries checksums.json (sha256 of each
file, and of bundle.json's content less the registry's stamp); a truncated ONNX file or an edited bundle.json is
refused at load (`rentalml serve` does not start) and at reload (409, the old version keeps answering v2 infer),
with a log line naming the file and the expected and actual digests. Real exported bundles, a real server."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid

import httpx
import pytest

tritonclient = pytest.importorskip("tritonclient")
import tritonclient.http as httpclient  # noqa: E402
from serving_helpers import MODEL, Server, make_bundle, v2_infer, v2_params, warm_users  # noqa: E402

from rentalml.runtime.bundle import CHECKSUMS, Bundle, BundleIntegrityError, file_sha256  # noqa: E402


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    return {"1": make_bundle(root / "v1", "1"), "2": make_bundle(root / "v2", "2"), "root": root}


def _copy(src, dst):
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def truncate(bundle, name="scorer.onnx"):
    """Cut a file of the bundle to half its size; returns (expected, actual) sha256."""
    path = bundle / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return json.loads((bundle / CHECKSUMS).read_text())["files"][name]["sha256"], file_sha256(path)


def edit_meta(bundle, **changes):
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["graph"].update(changes)
    (bundle / "bundle.json").write_text(json.dumps(meta, indent=2))


def test_the_writer_records_a_digest_of_every_file(bundles):
    b = bundles["1"]
    manifest = json.loads((b / CHECKSUMS).read_text())
    on_disk = {p.name for p in b.iterdir()} - {CHECKSUMS, "bundle.json"}
    assert set(manifest["files"]) == on_disk and {"scorer.onnx", "users.parquet"} <= on_disk
    assert all(manifest["files"][n]["sha256"] == file_sha256(b / n) for n in on_disk)
    assert Bundle(b).verified


def test_a_truncated_onnx_file_is_refused_naming_both_digests(bundles, tmp_path, caplog):
    b = _copy(bundles["1"], tmp_path / "b")
    expected, actual = truncate(b)
    with pytest.raises(BundleIntegrityError) as err:
        Bundle(b)
    assert "scorer.onnx" in str(err.value) and expected in str(err.value) and actual in str(err.value)
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("scorer.onnx" in m and expected in m and actual in m for m in logged), logged


def test_an_edited_bundle_json_is_refused_but_the_registry_stamp_is_not(bundles, tmp_path):
    b = _copy(bundles["1"], tmp_path / "b")
    meta = json.loads((b / "bundle.json").read_text())
    # fetch_bundle stamps the registry version after training: still the same model
    (b / "bundle.json").write_text(json.dumps({**meta, "model_version": "7",
                                               "registry": {"name": MODEL, "version": "7", "run_id": "r"}}))
    assert Bundle(b).model_version == "7"
    edit_meta(b, n_items=int(meta["graph"]["n_items"]) + 1)  # a bundle.json that no longer matches its graphs
    with pytest.raises(BundleIntegrityError, match="bundle.json: content sha256 mismatch"):
        Bundle(b)
    (b / "bundle.json").write_text('{"format_version": 1, "graph": {')  # a truncated bundle.json
    with pytest.raises(BundleIntegrityError, match="bundle.json is not JSON"):
        Bundle(b)


def test_a_bundle_without_checksums_loads_with_a_warning(bundles, tmp_path, caplog):
    b = _copy(bundles["1"], tmp_path / "b")
    (b / CHECKSUMS).unlink()
    assert not Bundle(b).verified
    assert any(CHECKSUMS in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_serve_refuses_to_start_on_a_corrupt_bundle(bundles, tmp_path):
    b = _copy(bundles["1"], tmp_path / "b")
    expected, actual = truncate(b)
    srv = Server(b, tmp_path / "serve.log")
    try:
        code = srv.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        srv.stop()
        pytest.fail("serve kept running on a truncated scorer.onnx")
    srv.stop()
    log = srv.log.read_text()
    assert code != 0
    assert "scorer.onnx: sha256 mismatch" in log and expected in log and actual in log, log[-3000:]


def _served_version(srv, users) -> str:
    c = httpclient.InferenceServerClient(f"127.0.0.1:{srv.http_port}")
    try:
        r = v2_infer(c, httpclient, users[:2], k=5)
        assert r.as_numpy("property_id").shape == (2, 5)
        return v2_params(r, False)["model_version"]
    finally:
        c.close()


def test_reload_refuses_a_corrupt_bundle_and_keeps_serving(bundles, tmp_path):
    served = _copy(bundles["1"], tmp_path / "served")
    users = warm_users(served)
    srv = Server(served, tmp_path / "reload.log")
    try:
        srv.wait_ready()
        assert _served_version(srv, users) == "1"
        # a new version whose ONNX file was truncated on its way to disk
        bad = _copy(bundles["2"], tmp_path / "v2-truncated")
        expected, actual = truncate(bad)
        r = httpx.post(f"{srv.url}/admin/reload", json={"champion": str(bad)}, timeout=60)
        assert r.status_code == 409 and "scorer.onnx" in r.text and expected in r.text, r.text
        assert _served_version(srv, users) == "1"
        # the served directory's own bundle.json edited under it: re-reading it (reload without a body) refuses
        edit_meta(served, history_len=1)
        r = httpx.post(f"{srv.url}/admin/reload", timeout=60)
        assert r.status_code == 409 and "bundle.json: content sha256 mismatch" in r.text, r.text
        assert _served_version(srv, users) == "1"
        assert httpx.get(f"{srv.url}/health").json()["model_version"] == "1"
        # an intact bundle still reloads: the refusals were the checksums, not reload itself
        r = httpx.post(f"{srv.url}/admin/reload", json={"champion": str(bundles["2"])}, timeout=60)
        assert r.status_code == 200, r.text
        assert _served_version(srv, users) == "2"
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-3000:]
    log = srv.log.read_text()
    assert f"scorer.onnx: sha256 mismatch: expected {expected}" in log and actual in log, log[-3000:]


# ------------------------------------------------------------------------------------------ Triton repositories
def test_a_triton_repository_is_written_only_from_an_intact_bundle(bundles, tmp_path):
    from rentalml.export.triton import verify_triton_checksums, write_triton_repo

    bad = _copy(bundles["1"], tmp_path / "bad")
    expected, actual = truncate(bad, "ranker.onnx")
    with pytest.raises(BundleIntegrityError, match="ranker.onnx") as err:
        write_triton_repo(bad, tmp_path / "repo")
    assert expected in str(err.value) and actual in str(err.value)
    assert not (tmp_path / "repo").exists()
    repo = write_triton_repo(bundles["1"], tmp_path / "repo")
    assert verify_triton_checksums(repo) == []
    model = repo / "rental-ranker" / "1" / "model.onnx"
    want = file_sha256(model)
    model.write_bytes(model.read_bytes()[:-100])  # truncated after it was written
    errors = verify_triton_checksums(repo)
    assert len(errors) == 1 and errors[0].startswith("rental-ranker/1/model.onnx: sha256 mismatch") and \
        want in errors[0] and file_sha256(model) in errors[0], errors


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server on loopback, its endpoint and keys in the environment (as the publish step gets them)."""
    from moto.server import ThreadedMotoServer

    from rentalml.services import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(key, value)
    yield
    server.stop()


def test_publish_refuses_a_corrupt_version_before_any_upload(bundles, tmp_path, s3):
    from rentalml.components import publish as p

    # a bucket name of this test's own: moto's backend is process-wide, so other tests' buckets may be there
    bucket = f"rentalml-corrupt-{uuid.uuid4().hex[:12]}"
    uri = f"s3://{bucket}/triton/rental-recommender/champion"
    serving = _copy(bundles["1"], tmp_path / "serving")  # the serving version, as fetched from the registry
    expected, _ = truncate(serving)
    with pytest.raises(p.PublishError, match="refusing to publish") as err:
        p.publish(version="2", bundle_dir=bundles["2"], storage_uri=uri, serving_version="1",
                  fetch_bundle=lambda v: serving)
    assert "scorer.onnx" in str(err.value) and expected in str(err.value)
    buckets = {b["Name"] for b in p.s3_client().list_buckets()["Buckets"]}
    assert bucket not in buckets  # nothing was written, not even the bucket
    # the repositories are checked again right before the upload: a file changed after it was written
    repos = p.build_repos({"1": bundles["1"], "2": bundles["2"]}, tmp_path / "work")
    p.check_repos(repos, ["cluster", "twin"])
    twin_model = next((repos["twin"] / "rental-retrieval" / "2").glob("model.onnx"))
    twin_model.write_bytes(twin_model.read_bytes()[:-1])
    with pytest.raises(p.PublishError, match="twin: rental-retrieval/2/model.onnx: sha256 mismatch"):
        p.check_repos(repos, ["cluster", "twin"])
    # intact bundles publish
    assert p.publish(version="2", bundle_dir=bundles["2"], storage_uri=uri, serving_version="1",
                     fetch_bundle=lambda v: bundles["1"])["versions"] == ["1", "2"]
