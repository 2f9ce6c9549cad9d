"""The rendered manifests: `kubectl kustomize` of an overlay (default dev) in a copy of the tree whose local secret
files are the committed *.env.example files, and lookups in the result (objects, secret values). The local
cluster (rentalml.pipelines.local_cluster) and the deploy tests read everything from here, so nothing is
configured a second time.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def render(overlay: str = "dev", root: Path | None = None, workdir: Path | None = None) -> list[dict]:
    """`kubectl kustomize manifests/overlays/<overlay>` in a copy of the tree whose local secret files are the
    committed *.env.example files (never a real secret file)."""
    root = root or REPO
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise RuntimeError("kubectl is not installed (it renders the manifests: kubectl kustomize)")
    work = Path(workdir or tempfile.mkdtemp(prefix="rentalml-render-"))
    tree = work / "tree"
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    shutil.copy(root / "kustomization.yaml", tree)
    shutil.copytree(root / "manifests", tree / "manifests", ignore=shutil.ignore_patterns("*.env"))
    for example in (tree / "manifests" / "components" / "local-secrets").glob("*.env.example"):
        shutil.copy(example, example.with_suffix(""))
    res = subprocess.run([kubectl, "kustomize", str(tree / "manifests" / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {overlay} failed:\n{res.stderr}")
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    hits = [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    if len(hits) != 1:
        raise KeyError(f"{kind} {name or ''}: {len(hits)} rendered objects")
    return hits[0]


def secret_data(docs: list[dict], name: str) -> dict[str, str]:
    import base64

    sec = find(docs, "Secret", name)
    out = {k: base64.b64decode(v).decode() for k, v in (sec.get("data") or {}).items()}
    out.update(sec.get("stringData") or {})
    return out
