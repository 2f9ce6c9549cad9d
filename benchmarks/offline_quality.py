"""Offline quality on real data through the fixed `rentalml benchmark` interface (baselines in the same run).

MovieLens latest-small (random-75-25, seed 42, k 10) and Albany Airbnb reviews (users with ≥ 2 reviews,
random-75-25 and cold-start-items). Needs ../shared/data. Results: benchmarks/results/*.json.
`--seeds 1,2,3,4,5` runs instead issue 14's quality table: random-75-25 on both datasets, one split and fit per
seed, mean ± std per model, every model in the same run (`*_random-75-25_seeds.json`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from rentalml.data.loaders import shared_data_dir

RESULTS = Path(__file__).parent / "results"


def run(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "rentalml.cli", "benchmark", *args]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


ML_MODELS = "popularity,collaborative,itemitem,hybrid,ease,als,itemknn"
AIRBNB_MODELS = "popularity,collaborative,content,itemitem,hybrid,ease,als,itemknn"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", default="", help="e.g. 1,2,3,4,5: the multi-seed quality table instead")
    args = ap.parse_args()
    data = shared_data_dir()
    if data is None:
        sys.exit("../shared/data is absent: offline quality benchmarks need it")
    RESULTS.mkdir(exist_ok=True)
    if args.seeds:
        run(["--interactions", str(data / "movielens-latest-small" / "ratings.csv"), "--protocol", "random-75-25",
             "--seeds", args.seeds, "--k", "10", "--models", ML_MODELS,
             "--json", str(RESULTS / "movielens_random-75-25_seeds.json")])
        run(["--interactions", "airbnb", "--min-user-interactions", "2", "--protocol", "random-75-25", "--seeds",
             args.seeds, "--k", "10", "--models", AIRBNB_MODELS,
             "--json", str(RESULTS / "airbnb_random-75-25_seeds.json")])
        return
    run(["--interactions", str(data / "movielens-latest-small" / "ratings.csv"), "--protocol", "random-75-25",
         "--seed", "42", "--k", "10", "--models", ML_MODELS,
         "--json", str(RESULTS / "movielens_random-75-25.json")])
    for protocol in ("random-75-25", "cold-start-items"):
        run(["--interactions", "airbnb", "--min-user-interactions", "2", "--protocol", protocol, "--seed", "42",
             "--k", "10", "--models", "popularity,collaborative,content,itemitem,hybrid,ease,itemknn",
             "--json", str(RESULTS / f"airbnb_{protocol}.json")])


if __name__ == "__main__":
    main()
