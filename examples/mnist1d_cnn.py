"""The `mnist1d-cnn` example: derive, explain, generate, train; prints the test accuracy and the time.

    python examples/mnist1d_cnn.py [--epochs N]        (the same as: chainrule train mnist1d-cnn)
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
    run_example("mnist1d-cnn", out_dir=args.out, epochs=args.epochs)
