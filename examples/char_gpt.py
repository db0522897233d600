"""The `char-gpt` example: a small GPT, derived from its declarations, trained on the characters of
the standard library's help topics (pydoc_data.topics); prints the falling validation loss and a
sample of generated text, and writes the loss curve and the derivation.

    python examples/char_gpt.py [--epochs STEPS] [--out DIR]        (the same as: chainrule train char-gpt)
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from chainrule.runtime.examples import script_main  # noqa: E402

if __name__ == "__main__":
    script_main("char-gpt")
