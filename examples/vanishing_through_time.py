"""Vanishing gradients through time, shown: ‖∂C/∂h_t‖ against t for an Elman RNN and an LSTM on the
same task (MNIST-1D read one value per step), at initialisation, plotted to a PNG, with the derived
recursions that explain the difference (the same as ``chainrule experiment vanishing-through-time``).

How ∂C/∂h_t is measured: the layers' diagnostic ``probe`` adds a zero parameter P[t, o] to every
state h_t, so the generated kernels return ∂C/∂P[t, o] = Σ_b ∂C/∂h[b, t, o], which for a batch of one
example is exactly the adjoint of h_t. The norms are averaged over examples.

    python examples/vanishing_through_time.py [--out DIR] [--examples 64] [--hidden 32]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from chainrule.runtime.experiments import vanishing_through_time  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join("chainrule-examples", "vanishing-through-time"))
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=32)
    args = ap.parse_args(argv)
    result = vanishing_through_time(args.out, examples=args.examples, hidden=args.hidden)
    for title, eqs in result["recursions"].items():
        print(f"the derived recursion ({title}):\n  " + "\n  ".join(eqs))
    print(f"plot: {result['plot']}\nreport: {result['report']}")
    return result


if __name__ == "__main__":
    main()
