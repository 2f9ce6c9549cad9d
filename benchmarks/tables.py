"""Print the markdown tables of docs/benchmarks.md from benchmarks/results/*.json (keeps the doc true)."""

from __future__ import annotations

import json
from pathlib import Path

from rentalml.evaluation.report import format_table

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    for name in ("movielens_random-75-25", "airbnb_random-75-25", "airbnb_cold-start-items"):
        path = RESULTS / f"{name}.json"
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        print(f"### {name} ({doc['train_pairs']} train / {doc['test_pairs']} test pairs)\n")
        print(format_table(doc))
        cold = {m: v["cold_start"] for m, v in doc["models"].items() if "cold_start" in v}
        if cold:
            print("\ncold-start-properties slice: " + ", ".join(
                f"{m} {v['ndcg@10']:.4f}" for m, v in cold.items()) + f" (users: {next(iter(cold.values()))['users']})")
        print()


if __name__ == "__main__":
    main()
