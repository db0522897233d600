"""The `residual-mlp` example: derive, explain, generate, train; prints the test accuracy and the time.

    python examples/residual_mlp.py [--epochs N] [--out DIR]        (the same as: chainrule train residual-mlp)
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from chainrule.runtime.examples import script_main  # noqa: E402

if __name__ == "__main__":
    script_main("residual-mlp")
