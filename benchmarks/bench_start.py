"""The start of `chainrule demo`: a cold run and warm runs, wall and CPU time, and what a warm run imports.

    python benchmarks/bench_start.py [--runs 5] [--cold 1] [--compare DIR]

Each checkout gets a private, empty kernel cache: the first run is cold (derive, generate, compile),
the next ``--runs`` are warm (everything from the cache). ``--cold N`` runs N cold starts per
checkout (alternating, each in a new empty cache; the CPU time includes the compile worker's), and
their medians are printed. ``--compare DIR`` (another checkout of
chainrule, e.g. main before a change) runs that checkout too, its warm runs alternating with this
one's so that both see the same load. Printed: medians of wall time and of CPU time (the child's
user + system), the ratio other / this, the load average, the test accuracy (it must be the same)
and the heavy modules a warm run imported.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
HEAVY = ("sympy", "jinja2", "sklearn", "scipy.linalg", "matplotlib")

# `chainrule demo` as the console script runs it (cli.run; cli.main in a checkout older than run),
# then, from an exit handler, the heavy modules it imported
CHILD = f"""
import atexit, json, sys
from chainrule import cli
atexit.register(lambda: print(json.dumps({{"imported": [m for m in {HEAVY!r} if m in sys.modules]}}), flush=True))
sys.argv = ["chainrule", "demo", "--out", sys.argv[1], "--no-progress"]
cli.run() if hasattr(cli, "run") else sys.exit(cli.main())
"""


def run_once(tree: Path, cache: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "CHAINRULE_CACHE_DIR": str(cache), "MPLBACKEND": "Agg"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(out)], env=env, capture_output=True, text=True,
                          cwd=out.parent, check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    accuracy = next(line.split(":")[1].strip() for line in proc.stdout.splitlines()
                    if line.startswith("test accuracy"))
    return {"wall": wall, "cpu": cpu, "load": os.getloadavg()[0], "accuracy": accuracy, **result}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="warm runs per checkout (default 5)")
    parser.add_argument("--cold", type=int, default=1, help="cold runs per checkout (default 1)")
    parser.add_argument("--compare", metavar="DIR", help="another chainrule checkout, run alternately")
    args = parser.parse_args()
    trees = {"this": HERE}
    if args.compare:
        trees["other"] = Path(args.compare).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        caches = {k: tmp / f"cache-{k}" for k in trees}
        colds = {k: [] for k in trees}
        for i in range(args.cold):       # each in an empty cache; the last one's is kept for the warm runs
            for k, tree in trees.items():
                cache = caches[k] if i == args.cold - 1 else tmp / f"cache-{k}-cold{i}"
                colds[k].append(run_once(tree, cache, tmp / f"out-{k}"))
        cold = {k: {"wall": statistics.median(r["wall"] for r in rs), "cpu": statistics.median(r["cpu"] for r in rs),
                    "accuracy": rs[-1]["accuracy"]} for k, rs in colds.items()}
        warm = {k: [] for k in trees}
        for _ in range(args.runs):
            for k, tree in trees.items():
                warm[k].append(run_once(tree, caches[k], tmp / f"out-{k}"))
    loads = [r["load"] for rs in [*warm.values(), *colds.values()] for r in rs]
    print(f"`chainrule demo`, {args.cold} cold and {args.runs} warm runs per checkout (medians), alternating; "
          f"{os.cpu_count()} CPUs, load average {min(loads):.1f}-{max(loads):.1f}")
    print(f"{'checkout':<8} {'cold wall':>9} {'cold CPU':>8} {'warm wall':>9} {'warm CPU':>8}  accuracy  imported")
    medians = {}
    for k, tree in trees.items():
        wall = statistics.median(r["wall"] for r in warm[k])
        cpu = statistics.median(r["cpu"] for r in warm[k])
        medians[k] = (wall, cpu)
        accuracies = {r["accuracy"] for r in warm[k]} | {cold[k]["accuracy"]}
        print(f"{k:<8} {cold[k]['wall']:>8.2f}s {cold[k]['cpu']:>7.2f}s {wall:>8.2f}s {cpu:>7.2f}s  "
              f"{', '.join(sorted(accuracies)):<9} {', '.join(warm[k][-1]['imported']) or '-'}  ({tree})")
    if "other" in medians:
        (w, c), (ow, oc) = medians["this"], medians["other"]
        print(f"ratio other / this (warm medians): wall {ow / w:.2f}, CPU {oc / c:.2f}")
        print(f"ratio other / this (cold medians): wall {cold['other']['wall'] / cold['this']['wall']:.2f}, "
              f"CPU {cold['other']['cpu'] / cold['this']['cpu']:.2f}")


if __name__ == "__main__":
    main()
