"""Evaluation reports: JSON + an HTML page with matplotlib plots (metric bars, training curves)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def write_report(result: dict, out_dir: str | Path, curves: dict[str, list[dict]] | None = None) -> Path:
    """Write report.json and report.html (with plots) for a benchmark/evaluation result."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=2, default=float))
    models = result.get("models", {})
    k = result.get("k", 10)
    metrics = [f"ndcg@{k}", f"recall@{k}", f"precision@{k}", f"map@{k}", "coverage"]
    imgs = []
    if models:
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2))
        for ax, m in zip(axes, metrics, strict=True):
            names = list(models)
            ax.bar(names, [models[n].get(m, 0.0) for n in names], color="#4c72b0")
            ax.set_title(m)
            ax.tick_params(axis="x", rotation=45)
        imgs.append(("Metrics by model", _png(fig)))
        cold = {n: v["cold_start"][f"ndcg@{k}"] for n, v in models.items() if "cold_start" in v}
        if cold:
            fig, ax = plt.subplots(figsize=(5, 3))
            ax.bar(list(cold), list(cold.values()), color="#dd8452")
            ax.set_title(f"cold-start properties slice: ndcg@{k}")
            ax.tick_params(axis="x", rotation=45)
            imgs.append(("Cold-start slice", _png(fig)))
    for name, hist in (curves or {}).items():
        if not hist:
            continue
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot([h["epoch"] for h in hist], [h["loss"] for h in hist], label="train loss")
        ax.set_xlabel("epoch")
        ax.set_title(f"{name}: training curve")
        val = [(h["epoch"], h["val_ndcg@10"]) for h in hist if "val_ndcg@10" in h]
        if val:
            ax2 = ax.twinx()
            ax2.plot(*zip(*val, strict=True), color="#55a868", label="val ndcg@10")
            ax2.set_ylabel("val ndcg@10")
        imgs.append((f"Training curve: {name}", _png(fig)))
    rows = "".join(
        "<tr><td>{}</td>{}</tr>".format(html.escape(n), "".join(f"<td>{v.get(m, 0.0):.4f}</td>" for m in metrics))
        for n, v in models.items())
    head = "".join(f"<th>{m}</th>" for m in metrics)
    body = [f"<h1>rentalml evaluation: {html.escape(str(result.get('dataset', '')))}</h1>",
            f"<p>protocol {html.escape(str(result.get('protocol', '')))}, k={k}, seed {result.get('seed', '')}</p>",
            f"<table border=1 cellpadding=4><tr><th>model</th>{head}</tr>{rows}</table>"]
    body += [f"<h2>{html.escape(t)}</h2><img src='data:image/png;base64,{b}'/>" for t, b in imgs]
    (out / "report.html").write_text("<html><body style='font-family:sans-serif'>" + "".join(body) + "</body></html>")
    return out / "report.html"


def format_table(result: dict) -> str:
    k = result.get("k", 10)
    cols = [f"ndcg@{k}", f"recall@{k}", f"precision@{k}", f"map@{k}", "coverage", "fit_seconds"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in result.get("models", {}).items():
        lines.append(f"| {name} | " + " | ".join(f"{m.get(c, float('nan')):.4f}" if c != "fit_seconds"
                                                 else f"{m.get(c, 0):.1f}" for c in cols) + " |")
    return "\n".join(lines)
