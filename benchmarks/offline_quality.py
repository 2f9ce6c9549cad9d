"""Offline quality on real data through the fixed `rentalml benchmark` interface (baselines in the same run).

MovieLens latest-small (random-75-25, seed 42, k 10) and Albany Airbnb reviews (users with ≥ 2 reviews,
random-75-25 and cold-start-items). Needs ../shared/data. Results: benchmarks/results/*.json.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rentalml.data.loaders import shared_data_dir

RESULTS = Path(__file__).parent / "results"


def run(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "rentalml.cli", "benchmark", *args]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    data = shared_data_dir()
    if data is None:
        sys.exit("../shared/data is absent: offline quality benchmarks need it")
    RESULTS.mkdir(exist_ok=True)
    run(["--interactions", str(data / "movielens-latest-small" / "ratings.csv"), "--protocol", "random-75-25",
         "--seed", "42", "--k", "10", "--models", "popularity,collaborative,itemitem,hybrid,ease,als,itemknn",
         "--json", str(RESULTS / "movielens_random-75-25.json")])
    for protocol in ("random-75-25", "cold-start-items"):
        run(["--interactions", "airbnb", "--min-user-interactions", "2", "--protocol", protocol, "--seed", "42",
             "--k", "10", "--models", "popularity,collaborative,content,itemitem,hybrid,ease,itemknn",
             "--json", str(RESULTS / f"airbnb_{protocol}.json")])


if __name__ == "__main__":
    main()
