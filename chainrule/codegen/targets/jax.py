"""The JAX target: the array printer's hooks spelled in ``jax.numpy`` (the generated module imports
jax; this file does not)."""
from __future__ import annotations

from .arrays import ArrayPrinter, Term


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
