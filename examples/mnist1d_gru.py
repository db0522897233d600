"""The `mnist1d-gru` example: a GRU reads MNIST-1D one value at a time; derive (backpropagation
through time), explain, generate, train; prints the test accuracy and the time.

    python examples/mnist1d_gru.py [--epochs N] [--out DIR]        (the same as: chainrule train mnist1d-gru)
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from chainrule.runtime.examples import script_main  # noqa: E402

if __name__ == "__main__":
    script_main("mnist1d-gru")
