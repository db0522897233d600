"""The PyTorch target: the array printer's hooks spelled in ``torch`` (the generated module imports
torch; this file does not)."""
from __future__ import annotations

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
        return f"{self.paren(code)}.flatten(-{k})"

    def window(self, code, axes, cols, offset):
        """``_window(T, sizes, steps, offset)``: ``T.as_strided`` over the read's box, its strides
        combined from T's own at run time (im2col with no copy); PyTorch has no negative strides."""
        if any(a < 0 for col in cols for a in col):
            return None
        sizes = self.shape_of(axes)
        steps = "(" + ", ".join("(" + ", ".join(map(str, col)) + ",)" for col in cols) + ("," if len(cols) == 1 else "") + ")"
        return f"_window({code}, {sizes}, {steps}, {tuple(offset)})"

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
