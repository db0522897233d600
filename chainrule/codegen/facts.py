"""Declared facts, checked on the data the kernels run on.

A derivation may use a fact declared on a tensor (``Tensor.simplex_axis``: the rows of a
probability target sum to one, so softmax + cross-entropy reduces to ``p - y``). The generated
gradient is then the gradient of the cost *only for data where the fact holds*: a masked all-zero
row or a doubled one-hot silently gets a gradient that disagrees with the cost. So every fact
declared on a tensor the kernels take as an argument (input or target) is checked on every array
before a kernel that relies on it runs, and a violation raises an error naming the tensor, the
fact and the first offending row.

Facts are found generically: each ``FACT_KINDS`` entry names a ``Tensor`` attribute and how to
check it; nothing here knows about a particular layer or loss. (A fact declared on a computed
tensor is a property of its equation, not of data, and is not checked here.)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from ..derive.errors import ChainruleError

__all__ = ["FactError", "Fact", "SimplexFact", "declared_facts", "FACT_KINDS", "FactTensor",
           "facts_to_data", "facts_from_data"]

ROW_SHOWN = 12          # entries of an offending row shown in the message
_TOLERANCES: dict = {}  # (array dtype, data dtype, summed length) -> tolerance


class FactError(ChainruleError, ValueError):
    """Data that breaks a fact declared on a tensor, on which the derived gradient relies."""


@dataclass(frozen=True)
class FactTensor:
    """What a fact's checks and messages need of the tensor it is declared on, as plain data (so
    that a run loading its kernels from the cache checks facts without the symbolic model)."""

    name: str
    role: str
    layer: str
    batch_axes: tuple            # per axis: is it the batch axis B?

    @classmethod
    def of(cls, tensor):
        from ..derive.layers import B
        return cls(tensor.name, tensor.role, tensor.layer or "", tuple(bool(s == B) for s in tensor.shape))


def _index_names(t, summed_axis):
    """Index names for a statement about ``t``: ``b`` for the batch axis, ``k`` for the summed one."""
    pool = iter(("i", "j", "l", "m", "h", "w", "u", "v"))
    names = []
    for a, batch in enumerate(t.batch_axes):
        names.append("k" if a == summed_axis else "b" if batch and "b" not in names else next(pool))
    return names


@dataclass(frozen=True, eq=False)
class Fact:
    """A fact declared on tensor ``tensor``; ``check`` raises ``error`` when an array breaks it."""

    tensor: FactTensor
    always = False                      # checked before every kernel, not only before gradients

    @property
    def declared_by(self) -> str:
        layer = self.tensor.layer or ""
        return layer.split(":", 1)[-1] if layer else "its declaration"

    def statement(self) -> str:
        raise NotImplementedError

    def check(self, arr: np.ndarray, *, what: str = "", error=FactError, data_dtype=None):
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class SimplexFact(Fact):
    """``Σ_k t[..., k, ...] = 1`` over ``axis`` (a probability distribution)."""

    axis: int = -1

    def statement(self) -> str:
        names = _index_names(self.tensor, self.axis)
        others = [n for a, n in enumerate(names) if a != self.axis]
        text = f"Σ_k {self.tensor.name}[{', '.join(names)}] = 1"
        return text + (f" for every {', '.join(others)}" if others else "")

    def tolerance(self, arr, data_dtype) -> float:
        """The rounding of a sum of ``k`` entries in the coarser of the data's and the kernels'
        dtypes, but at least 1e-6 (float64 kernels) or 1e-4 (float32): far below what a masked,
        doubled or unnormalised row breaks it by, and a deviation that changes the gradient by no
        more than the finite-difference check can see."""
        floor = 1e-4 if arr.dtype == np.float32 else 1e-6
        eps = np.finfo(arr.dtype).eps if arr.dtype.kind == "f" else 0.0
        if data_dtype is not None and np.dtype(data_dtype).kind == "f":
            eps = max(eps, np.finfo(data_dtype).eps)
        k = arr.shape[self.axis] if arr.ndim else 1
        return max(64.0 * float(eps) * max(k, 1), floor)

    def cached_tolerance(self, arr, data_dtype) -> float:
        """:meth:`tolerance`, computed once per (dtypes, summed length): np.finfo is slow next to
        a minibatch."""
        key = (arr.dtype, data_dtype, arr.shape[self.axis % arr.ndim])
        tol = _TOLERANCES.get(key)
        if tol is None:
            tol = _TOLERANCES[key] = self.tolerance(arr, data_dtype)
        return tol

    def check(self, arr, *, what="", error=FactError, data_dtype=None):
        arr = np.asarray(arr)
        axis = self.axis % arr.ndim
        sums = arr.sum(axis=axis, dtype=np.float64)
        sums -= 1.0
        tol = self.cached_tolerance(arr, data_dtype)
        if np.abs(sums, out=sums).max(initial=0.0) <= tol:   # the fast path (a NaN fails it)
            return
        sums = arr.sum(axis=axis, dtype=np.float64)          # (the fast path overwrote them)
        bad = ~(np.abs(sums - 1.0) <= tol)                 # NaN rows break it too
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        row = arr[where[:axis] + (slice(None),) + where[axis:]]
        shown = ", ".join(f"{v:.6g}" for v in row[:ROW_SHOWN].tolist())
        shown = f"[{shown}{', ...' if row.size > ROW_SHOWN else ''}]"
        r = str(where[0]) if len(where) == 1 else str(list(where))
        count = int(bad.sum())
        prefix = f"{what}: " if what else ""
        raise error(
            f"{prefix}{self.tensor.role} {self.tensor.name} breaks the fact {self.statement()} "
            f"declared by {self.declared_by} (a probability distribution over axis {axis}), on which "
            f"the derived gradient relies: row {r} is {shown} (sum {sums[where]:.6g}, tolerance "
            f"{tol:.1e}); {count} row{'s' if count > 1 else ''} break{'' if count > 1 else 's'} it")


@dataclass(frozen=True, eq=False)
class TokenFact(Fact):
    """Every entry is an integer token id in ``[0, vocab)``: it selects a row of a table (an
    embedding), and an id outside would read outside the table. Checked before every kernel."""

    vocab: int = 0
    reader: str = ""            # "layer 1:embedding(64), whose table E1 (103, 64)": who selects the rows
    always = True

    def statement(self) -> str:
        return f"every {self.tensor.name}[b, t] is an integer in [0, {self.vocab})"

    def check(self, arr, *, what="", error=FactError, data_dtype=None):
        arr = np.asarray(arr)
        bad = ~((arr >= 0) & (arr < self.vocab) & (arr == np.floor(arr)))
        if not bad.any():
            return
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        prefix = f"{what}: " if what else ""
        raise error(f"{prefix}{self.tensor.role} {self.tensor.name} {arr.shape} holds token id "
                    f"{arr[where].item():g} at {list(where)}, outside the vocabulary [0, {self.vocab}) of "
                    f"{self.reader or 'the embedding that reads it'}; {int(bad.sum())} entr"
                    f"{'ies are' if bad.sum() > 1 else 'y is'} outside")


def token_reader(model, t) -> str:
    """The layer whose table the token ids ``t`` select rows of, and that table with its shape:
    found as the read whose index is a read of ``t`` (``E[x[b, t], o]``)."""
    import sympy as sp

    from ..derive.tensor import shape_str
    for eq in model.equations:
        for name, idx in eq.reads():
            if any(isinstance(i, sp.Indexed) and str(i.base.label) == t.name for i in idx):
                table = model.tensors[name]
                return (f"layer {eq.layer or eq.out.name}, whose table {table.name} "
                        f"{shape_str(table.shape, model.size_values)} has one row per token")
    return ""


# Tensor attribute (or ``meta`` key) -> the fact it declares (add a fact kind here, never in a caller)
FACT_KINDS = {
    "simplex_axis": lambda t, axis, model: SimplexFact(FactTensor.of(t), axis=axis),
    "vocab": lambda t, vocab, model: TokenFact(FactTensor.of(t), vocab=int(vocab), reader=token_reader(model, t)),
}
_FACT_CLASSES = {cls.__name__: cls for cls in (SimplexFact, TokenFact)}


def declared_facts(model, names=None) -> list[Fact]:
    """Every fact declared on the model's tensors (only on ``names``, when given)."""
    out = []
    for t in model.tensors.values():
        if names is not None and t.name not in names:
            continue
        for attr, make in FACT_KINDS.items():
            value = getattr(t, attr, None)
            if value is None:
                value = t.meta.get(attr)
                if attr == "vocab" and value is not None:      # a size symbol: its value
                    value = value.subs(model.size_values)
            if value is not None:
                out.append(make(t, value, model))
    return out


def facts_to_data(facts) -> list[dict]:
    """The facts as JSON-ready data (a cached model description keeps them)."""
    out = []
    for f in facts:
        data = {k: v for k, v in asdict(f).items() if k != "tensor"}
        tensor = asdict(f.tensor)
        tensor["batch_axes"] = list(tensor["batch_axes"])
        out.append({"kind": type(f).__name__, "tensor": tensor, **data})
    return out


def facts_from_data(data) -> list[Fact]:
    """The inverse of :func:`facts_to_data` (only the fact kinds this module defines)."""
    out = []
    for item in data:
        cls = _FACT_CLASSES[item["kind"]]
        t = item["tensor"]
        tensor = FactTensor(t["name"], t["role"], t["layer"], tuple(t["batch_axes"]))
        out.append(cls(tensor, **{f.name: item[f.name] for f in fields(cls) if f.name != "tensor"}))
    return out
