"""The `autoencoder` example: derive, explain, generate, train; prints its measure, writes its plots and derivation.

    python examples/autoencoder.py [--epochs N] [--out DIR]        (the same as: chainrule train autoencoder)
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from chainrule.runtime.examples import script_main  # noqa: E402

if __name__ == "__main__":
    script_main("autoencoder")
