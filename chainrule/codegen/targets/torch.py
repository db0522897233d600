"""The PyTorch target: the array printer's hooks spelled in ``torch`` (the generated module imports
torch; this file does not)."""
from __future__ import annotations

import sympy as sp

from .arrays import ArrayPrinter, Term


class TorchPrinter(ArrayPrinter):
    lib = "torch"
    target = "torch"
    template = "torch_module.py.j2"

    def arange(self, lo, hi):
        return f"torch.arange({lo}, {hi}, device=dev)"

    def transpose(self, code, perm):
        return f"{self.paren(code)}.permute({', '.join(map(str, perm))})"

    def clamp(self, code, lo, hi):
        return f"{self.paren(code)}.clamp({lo}, {hi})"

    def to_float(self, term):
        return f"{self.paren(term.code if isinstance(term, Term) else term)}.to(dt)"

    def constant(self, code):
        return f"torch.tensor({code}, dtype=dt, device=dev)"

    def broadcast(self, term, axes):
        shape = self.shape_of(axes)
        if term.number:
            return f"torch.full({shape}, {term.code}, dtype=dt, device=dev)"
        return f"{self.align(term, axes)}.expand{shape}"

    def reduce(self, op, code, dims):
        d = dims[0] if len(dims) == 1 else tuple(dims)
        return f"torch.{op}({code}, dim={d})"

    def flatten_last(self, code, k):
        # contiguous: torch's argmax over the last axis of a strided window is ~10x slower than a
        # copy and an argmax over contiguous rows
        return f"{self.paren(code)}.flatten(-{k}).contiguous()"

    def window(self, code, shape, axes, cols, offset):
        """``_window(T, sizes, steps, offset)``: ``T.as_strided`` over the read's box, its strides
        combined from T's own at run time (im2col with no copy). PyTorch has no negative strides: an
        axis read backwards (a flipped kernel, ``W[2 - t]``) is flipped first (a copy of T)."""
        flip = [j for j in range(len(offset)) if any(col[j] < 0 for col in cols)]
        if any(col[j] > 0 for j in flip for col in cols) or any(not sp.sympify(shape[j]).is_Integer for j in flip):
            return None
        if flip:
            code = f"torch.flip({code}, dims=({', '.join(map(str, flip))},))"
            cols = [[-a if j in flip else a for j, a in enumerate(col)] for col in cols]
            offset = [int(shape[j]) - 1 - o if j in flip else o for j, o in enumerate(offset)]
        sizes = self.shape_of(axes)
        steps = "(" + ", ".join("(" + ", ".join(map(str, col)) + ",)" for col in cols) + ("," if len(cols) == 1 else "") + ")"
        return f"_window({code}, {sizes}, {steps}, {tuple(offset)})"

    def pad(self, code, pads):
        flat = [str(v) for a, b in reversed(pads) for v in (a, b)]
        return f"torch.nn.functional.pad({code}, ({', '.join(flat)}))"

    def index(self, code, shape, parts):
        """One gather by the flat (row-major) position: ``torch.take`` is much faster than indexing
        with several broadcast index arrays."""
        strides, flat = [], []
        for k in range(len(shape)):
            stride = 1
            for n in shape[k + 1:]:
                stride *= n
            strides.append(stride)
        for p, st in zip(parts, strides):
            flat.append(p if st == 1 else f"{self.paren(p)} * {self.size_code(st)}")
        return f"torch.take({code}, {' + '.join(flat)})"

    def scatter_add(self, rows, ids, values, sizes):
        shape = ", ".join([rows, *sizes])
        return (f"torch.zeros(({shape}{',' if not sizes else ''}), dtype=dt, device=dev).index_add_("
                f"0, {self.paren(ids)}.reshape(-1), {self.paren(values)}.reshape({', '.join(['-1', *sizes])}))")

    def argmax(self, code):
        return f"torch.argmax({code}, dim=-1)"

    # -- time loops: a Python loop over t of tensor operations ------------------------------------
    def conditional(self, cond, a, b, axes):
        if a.number and b.number:
            return f"({a.code} if {cond} else {b.code})"
        ca = self.align(a, axes) if not a.number else self.broadcast(a, axes)
        cb = self.align(b, axes) if not b.number else self.broadcast(b, axes)
        return f"({ca} if {cond} else {cb})"

    def step_slice(self, seq, axis, rank, at, length):
        return f"{seq}[{', '.join(at if k == axis else ':' for k in range(rank))}]"

    def slice_or_initial(self, name, seq, axis, rank, at, inside, length, init_lines, shape):
        view = self.step_slice(seq, axis, rank, at, length)
        if not init_lines:
            return [f"{name} = {view} if {inside} else torch.zeros({shape}, dtype=dt, device=dev)"]
        return [f"if {inside}:", f"    {name} = {view}", "else:"] + [f"    {ln}" for ln in init_lines]

    def store(self, seq, axis, rank, t, value):
        return f"{seq}[{', '.join(t if k == axis else ':' for k in range(rank))}] = {value}"

    def time_loop(self, t, length, direction, sequences, body):
        lines = [f"{ident} = torch.empty({shape}, dtype=dt, device=dev)" for ident, shape in sequences]
        steps = f"range({length})" if direction > 0 else f"range({length - 1}, -1, -1)"
        return lines + [f"for {t} in {steps}:"] + [f"    {ln}" for ln in body]

    # -- contractions: a matrix product whose operands are copied walking memory forwards ---------
    def contract(self, a, b, out_axes):
        """``Σ a b`` over the axes they share (none of them kept) as one ``matmul`` of 2-D views.
        torch.einsum lays a strided window (im2col) out as (kept, summed) whatever its memory
        order, and copying it across memory costs 10-20x the product; here each operand is laid
        out (kept, summed) or (summed, kept), whichever ends on its shortest step, and transposed
        for the product as a view."""
        if a.number or b.number or a.kind != "float" or b.kind != "float":
            return None
        shared = [x for x in a.axes if x in b.axes]
        free_a = [x for x in a.axes if x not in shared]
        free_b = [x for x in b.axes if x not in shared]
        if not shared or len(set(a.axes)) != len(a.axes) or len(set(b.axes)) != len(b.axes) \
                or set(free_a) & set(free_b) or set(free_a + free_b) != set(out_axes):
            return None                      # batched, or an axis summed in one operand: einsum
        step_a, step_b = self._steps_of(a), self._steps_of(b)
        big = step_a if self._volume(a) >= self._volume(b) else step_b
        summed = sorted(shared, key=lambda x: -abs(big[x]))    # one order for both operands
        left, a_kept_first = self._matrix(a, free_a, summed, step_a)
        right, b_kept_first = self._matrix(b, free_b, summed, step_b)
        if free_a and not a_kept_first:
            left = f"{left}.T"
        if free_b and b_kept_first:
            right = f"{right}.T"
        kept_a = sorted(free_a, key=lambda x: -abs(step_a[x]))
        kept_b = sorted(free_b, key=lambda x: -abs(step_b[x]))
        code = f"({left} @ {right})"
        order = tuple(kept_a + kept_b)
        if len(order) != 2 or not (free_a and free_b):
            code = f"{code}.reshape{self.shape_of(order)}" if order else code
        if order and order != tuple(out_axes):
            code = self.transpose(code, [order.index(x) for x in out_axes])
        return code

    def _steps_of(self, t):
        if t.steps is not None:
            return dict(zip(t.axes, t.steps))
        steps, acc = {}, 1
        for x in reversed(t.axes):
            steps[x] = acc
            e = self.extent(x)
            acc *= int(e) if sp.sympify(e).is_Integer else 1 << 20
        return steps

    def _volume(self, t):
        v = 1
        for x in t.axes:
            e = self.extent(x)
            v *= int(e) if sp.sympify(e).is_Integer else 1 << 20
        return v

    def _matrix(self, t, free, summed, steps):
        """``t`` as a 2-D (kept, summed) or (summed, kept) view or copy; returns (code, kept first).
        The group ending on the shorter step (the longer run, on a tie) goes last."""
        kept = sorted(free, key=lambda x: -abs(steps[x]))

        def inner(group):
            last = group[-1]
            e = self.extent(last)
            return (abs(steps[last]), -(int(e) if sp.sympify(e).is_Integer else 1 << 20))
        kept_first = bool(kept) and inner(summed) <= inner(kept)
        order = kept + summed if kept_first else summed + kept
        code = t.code
        if tuple(order) != tuple(t.axes):
            code = self.transpose(code, [t.axes.index(x) for x in order])
        if not kept:
            return f"{self.paren(code)}.reshape(-1)", True
        rows = self._size_of(kept if kept_first else summed)
        return f"{self.paren(code)}.reshape({rows}, -1)", kept_first

    def _size_of(self, axes):
        total = sp.Integer(1)
        for x in axes:
            total *= self.extent(x)
        return self.size_code(total)
