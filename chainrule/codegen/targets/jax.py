"""The JAX target: the array printer's hooks spelled in ``jax.numpy`` (the generated module imports
jax; this file does not)."""
from __future__ import annotations

from .arrays import ArrayPrinter, Term, identifier


class JaxPrinter(ArrayPrinter):
    lib = "jnp"
    target = "jax"
    template = "jax_module.py.j2"

    def arange(self, lo, hi):
        return f"jnp.arange({lo}, {hi})"

    def transpose(self, code, perm):
        return f"jnp.transpose({code}, ({', '.join(map(str, perm))},))"

    def clamp(self, code, lo, hi):
        return f"jnp.clip({code}, {lo}, {hi})"

    def to_float(self, term):
        return f"{self.paren(term.code if isinstance(term, Term) else term)}.astype(dt)"

    def constant(self, code):
        return f"jnp.asarray({code}, dtype=dt)"

    def broadcast(self, term, axes):
        shape = self.shape_of(axes)
        if term.number:
            return f"jnp.full({shape}, {term.code}, dtype=dt)"
        return f"jnp.broadcast_to({self.align(term, axes)}, {shape})"

    def reduce(self, op, code, dims):
        d = dims[0] if len(dims) == 1 else tuple(dims)
        fn = {"logsumexp": "jax.scipy.special.logsumexp", "amax": "jnp.max", "sum": "jnp.sum"}[op]
        return f"{fn}({code}, axis={d})"

    def flatten_last(self, code, k):
        return f"{self.paren(code)}.reshape({self.paren(code)}.shape[:-{k}] + (-1,))"

    def scatter_add(self, rows, ids, values, sizes):
        shape = ", ".join([rows, *sizes])
        return (f"jnp.zeros(({shape}{',' if not sizes else ''}), dtype=dt).at[{self.paren(ids)}.reshape(-1)]"
                f".add({self.paren(values)}.reshape(({', '.join(['-1', *sizes])}{',' if not sizes else ''})))")

    def argmax(self, code):
        return f"jnp.argmax({code}, axis=-1)"

    # -- time loops: jax.lax.fori_loop over t (traced once), the sequences as its carry -------------
    def conditional(self, cond, a, b, axes):
        return f"jnp.where({cond}, {self.align(a, axes)}, {self.align(b, axes)})"

    def step_slice(self, seq, axis, rank, at, length):
        # t is traced: the index is clipped into the sequence (a read outside is masked by the caller)
        return f"{seq}[{', '.join(at if k == axis else ':' for k in range(rank))}]"

    def slice_or_initial(self, name, seq, axis, rank, at, inside, length, init_lines, shape):
        clipped = f"jnp.clip({at}, 0, {length - 1})"
        view = self.step_slice(seq, axis, rank, clipped, length)
        # the initial state (init_lines set name to it), or zeros
        return list(init_lines) + [f"{name} = jnp.where({inside}, {view}, {name if init_lines else '0.0'})"]

    def store(self, seq, axis, rank, t, value):
        return f"{seq} = {seq}.at[{', '.join(t if k == axis else ':' for k in range(rank))}].set({value})"

    def time_loop(self, t, length, direction, sequences, body):
        names = ", ".join(ident for ident, _ in sequences) + ("," if len(sequences) == 1 else "")
        step = identifier("step_" + sequences[0][0], self.taken)
        counter = t if direction > 0 else identifier("k", self.taken)
        lines = [f"def {step}({counter}, carry):", f"    {names} = carry"]
        if direction < 0:
            lines.append(f"    {t} = {length - 1} - {counter}   # backward in time")
        lines += [f"    {ln}" for ln in body] + [f"    return {names}"]
        zeros = ", ".join(f"jnp.zeros({shape}, dtype=dt)" for _, shape in sequences)
        lines.append(f"{names} = jax.lax.fori_loop(0, {length}, {step}, ({zeros}{',' if len(sequences) == 1 else ''}))")
        return lines
