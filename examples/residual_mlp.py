"""The `residual-mlp` example: derive, explain, generate, train; prints the test accuracy and the time.

    python examples/residual_mlp.py [--epochs N]        (the same as: chainrule train residual-mlp)
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from chainrule.runtime.examples import run_example  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    run_example("residual-mlp", out_dir=args.out, epochs=args.epochs)
