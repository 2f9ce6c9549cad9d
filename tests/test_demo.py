"""`make demo`'s loop end to end (smaller marketplace): generate → database → feature store → evaluate → pipeline
(ingest from the database) → register → Tansu + serve → ask → stream events → ask again (fold-in, fresh features)
→ drift check."""

from __future__ import annotations

import os
import subprocess
import sys


def test_demo_runs_the_whole_loop(tmp_path):
    env = {**os.environ, "RENTALML_HOME": str(tmp_path / "home"), "KSERVE_LOGLEVEL": "WARNING"}
    env.pop("RENTALML_MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "rentalml.demo", "--users", "300", "--properties", "150",
                           "--events", "6000", "--epochs", "5"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    for model in ("popularity", "collaborative", "content", "hybrid"):
        assert f"| {model} |" in out
    assert "alias champion" in out
    assert "u_new_visitor" in out and "server and broker stopped" in out
    recs = [line for line in out.splitlines() if "->" in line and line.strip().startswith("u_")]
    assert len(recs) == 6 and all(line.count("p_") == 5 for line in recs)
    visitor = [line for line in recs if line.strip().startswith("u_new_visitor")]
    assert "[cold_start" in visitor[0] and "[model" in visitor[1]  # folded in from streamed views, no retraining
    assert "stream processor:" in out and "now explained as:" in out
    assert "drift over threshold:" in out
    assert (tmp_path / "home" / "rentalml.db").exists() and (tmp_path / "home" / "feast" / "registry.db").exists()
    assert (tmp_path / "home" / "mlflow.db").exists()
    assert not (tmp_path / "mlruns").exists()  # artifacts stay under the state dir
    # a quiet first run: the demo's own lines only; kfp.local, server and library chatter go to the log it names
    assert len(out.splitlines()) < 80, out
    log = tmp_path / "home" / "demo.log"
    assert f"logs: {log}" in out and "Task 'ingest'" in log.read_text() and "Executing task" not in out
