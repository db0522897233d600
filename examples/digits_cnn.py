"""The `digits-cnn` example: derive, explain, generate, train; prints the test accuracy and the time.

    python examples/digits_cnn.py [--epochs N] [--out DIR]        (the same as: chainrule train digits-cnn)
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from chainrule.runtime.examples import script_main  # noqa: E402

if __name__ == "__main__":
    script_main("digits-cnn")
