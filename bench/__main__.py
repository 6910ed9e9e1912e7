"""`make bench`: run every benchmark in turn (each prints a table and writes bench/results/*.json).

python -m bench [NAME ...]   NAME in: export_speed, stream, oip, accuracy (default: all, accuracy last:
it trains 6 models and takes the longest).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

ORDER = ["export_speed", "stream", "oip", "accuracy"]


def main() -> int:
    names = sys.argv[1:] or ORDER
    failed = []
    for name in names:
        if importlib.util.find_spec(f"bench.{name}") is None:
            print(f"bench.{name}: not built yet, skipped")
            continue
        print(f"\n=== bench.{name} ===", flush=True)
        # One process each: benchmarks set thread counts and must not share warmed-up state.
        if subprocess.call([sys.executable, "-m", f"bench.{name}"]) != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
