"""Naming what a derived equation computes, by the shape of its index maps (never by layer).

A textbook says "the input gradient of a convolution is a full correlation of δ with the flipped
kernel". chainrule reads that off the derived equation itself: a read of a parameter whose index
runs *backwards* in a summation index while it runs forwards in a free one (``W[j - s h]``) is a
flipped kernel; a read of the input shifted by a free index (``x[s h + d p]``) against an adjoint at
``h`` is a correlation of the input with δ; an argmax bracket routes the adjoint; a constant weight
on an adjoint summed over a window spreads it. Each recognised pattern becomes one sentence.
"""
from __future__ import annotations

import sympy as sp

from .primitives import IsArgmax


def _reads(expr):
    return [r for r in expr.atoms(sp.Indexed)]


def _summed(expr) -> set:
    out = set()
    for s in expr.atoms(sp.Sum):
        out |= set(s.variables)
    return out


def _coeff(e, v):
    c = sp.expand(e).coeff(v)
    return c if c.is_number else None


def describe(eq, tensors: dict, inline) -> list[str]:
    """Sentences naming the patterns in the adjoint equation ``eq`` (``inline`` typesets an expression)."""
    body, free, summed = eq.body, set(eq.indices), _summed(eq.body)
    out = []
    reads = _reads(body)
    adjoints = [r for r in reads if tensors.get(str(r.base.label)) is not None
                and tensors[str(r.base.label)].role == "adjoint"]
    # a flipped kernel: a parameter read at (free index) - (stride) x (summation index)
    for r in reads:
        t = tensors.get(str(r.base.label))
        if t is None or t.role != "param":
            continue
        flips = []
        for e in r.indices:
            for j in free & e.free_symbols:
                for h in summed & e.free_symbols:
                    cj, ch = _coeff(e, j), _coeff(e, h)
                    if cj is not None and ch is not None and cj > 0 and ch < 0:
                        flips.append((e, j, h, -ch / cj))
        if flips and adjoints:
            idx = ", ".join(inline(e) for e, *_ in flips)
            hs = ", ".join(inline(h) for _, _, h, _ in flips)
            strides = sorted({s for *_, s in flips})
            text = (f"This is a full correlation of {inline(adjoints[0])} with the flipped kernel "
                    f"${t.latex}$ (a convolution in the strict sense): the kernel is read at {idx}, which "
                    f"{'runs' if len(flips) == 1 else 'run'} backwards as {hs} {'runs' if len(flips) == 1 else 'run'} forwards, and the summation limits keep exactly the outputs "
                    f"whose window covers this position, including windows that overhang the border "
                    f"('full').")
            if strides != [1]:
                text += (f" With stride {', '.join(inline(s) for s in strides)}, the adjoint is spread out "
                         f"(zeros between its entries) before the correlation: a transposed convolution.")
            if body.has(sp.Mod):
                text += " The divisibility bracket keeps only the positions a dilated kernel touches."
            out.append(text)
            break
    # a kernel gradient: an adjoint at h against a non-parameter read shifted by a free index
    owner = tensors.get(eq.out.meta.get("of", ""))
    if owner is not None and owner.role == "param" and adjoints:
        for r in reads:
            t = tensors.get(str(r.base.label))
            if t is None or t.role in ("param", "adjoint"):
                continue
            shifted = [e for e in r.indices if free & e.free_symbols and summed & e.free_symbols]
            if shifted:
                out.append(f"This is the correlation of ${t.latex}$ with {inline(adjoints[0])}: each kernel "
                           f"entry sums, over every example and output position, the input under it "
                           f"(at {', '.join(inline(e) for e in shifted)}) times the adjoint there.")
                break
    # a constant share of an adjoint summed over the windows that cover this position (average pooling)
    coeff, rest = body.as_coeff_Mul()
    if isinstance(rest, sp.Sum) and coeff.is_Rational and coeff != 1 and isinstance(rest.function, sp.Indexed) \
            and rest.function in adjoints and not body.has(IsArgmax):
        out.append(f"Each position receives the share {inline(coeff)} of the adjoint of every window that "
                   f"covers it: the adjoint is spread evenly over the window (average pooling's "
                   f"{inline(coeff)} = 1/window size).")
    jvp = _softmax_jvp(body, tensors)
    if jvp is not None:
        A, G = jvp
        out.append(f"This is the softmax's Jacobian-vector product {inline(A)} ⊙ ({inline(G)} − rowsum("
                   f"{inline(A)} ⊙ {inline(G)})). The row sum appears because every weight of a row shares "
                   f"one normaliser, the log-sum-exp of the row's scores: raising one score raises its own "
                   f"weight and lowers every other weight of the row. So each score's gradient is its weight "
                   f"times its own upstream gradient minus the weighted mean of the row's upstream gradients.")
    for a in body.atoms(IsArgmax):
        out.append(f"The bracket {inline(a)} routes the adjoint to the position of the maximum of each "
                   f"window and nothing to the other positions (ties: the first maximal position, "
                   f"row-major, as PyTorch).")
        break
    return out


def _softmax_jvp(body, tensors):
    """``A[i..] · (G[i..] − Σ_{k'} A[..k'] G[..k'])`` (A a forward tensor, G an adjoint, the sum over
    one index of a row, in its last position) -> (A read, G read), else None."""
    if not body.is_Mul or len(body.args) != 2:
        return None
    for A, rest in (body.args, body.args[::-1]):
        if not (isinstance(A, sp.Indexed) and rest.is_Add and len(rest.args) == 2):
            continue
        G = next((a for a in rest.args if isinstance(a, sp.Indexed)), None)
        row = next((a for a in rest.args if a is not G), None)
        if G is None or tuple(G.indices) != tuple(A.indices):
            continue
        g = tensors.get(str(G.base.label))
        if g is None or g.role != "adjoint":
            continue
        neg, s = row.as_coeff_Mul()
        if neg != -1 or not isinstance(s, sp.Sum) or len(s.limits) != 1:
            continue
        k = s.limits[0][0]
        last = A.indices[-1]
        if s.function == (A * G).xreplace({last: k}) or sp.expand(s.function - (A * G).xreplace({last: k})) == 0:
            return A, G
    return None
