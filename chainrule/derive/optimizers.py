"""Optimisers as declared math: each is a short list of elementwise update equations.

An update rule is declared once, over one generic parameter element θ_i, its gradient g_i, its state
tensors (momentum, moments, accumulators) and hyperparameters (SymPy symbols). Assignments run in
order, and each reads the latest value of what it reads (the papers' pseudo-code). From this one
declaration come

* the explanation (``explain_optimizer``), including what the engine can say about the rule by
  itself: a state that is an exponential moving average is solved in closed form for a constant
  gradient, which shows why Adam divides by 1 - β^t (bias correction), and AdamW's decoupled weight
  decay is compared with L2 in the loss by deriving both (``explain_decoupled_decay``);
* the generated code: ``chainrule.codegen`` instantiates the equations for every parameter of a
  model and lowers them with the same lowering and printer as the forward and backward equations,
  fused into ``train_step``.

Nothing here is written per optimiser except its equations and hyperparameter defaults.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from .errors import SpecError
from .tensor import Equation, Tensor, index, size

N = size("N")                                   # the generic parameter's number of elements
I = index("i")
STEP = sp.Symbol("t", integer=True, positive=True)   # the step count, 1 at the first update


def hyper(name: str, latex: str | None = None) -> sp.Symbol:
    """A hyperparameter (a positive real symbol); ``latex`` is how it prints."""
    s = sp.Symbol(name, positive=True)
    HYPER_LATEX[name] = latex or name
    return s


HYPER_LATEX: dict = {}
eta = hyper("eta", r"\eta")
mu = hyper("mu", r"\mu")
rho = hyper("rho", r"\rho")
beta1 = hyper("beta1", r"\beta_1")
beta2 = hyper("beta2", r"\beta_2")
epsilon = hyper("epsilon", r"\epsilon")
lam = hyper("lambda_wd", r"\lambda")

THETA = Tensor("theta", (N,), role="param", latex=r"\theta")
GRAD = Tensor("g", (N,), role="hidden", latex="g")


@dataclass
class UpdateRule:
    """An optimiser: state tensors, hyperparameters with defaults, and ordered assignments.

    ``assignments`` is a list of ``(target, body)``: ``target`` is ``"theta"`` or a state name, the
    body an expression over ``θ[i]``, ``g[i]``, state reads, hyperparameters and the step ``t``.
    """

    name: str
    title: str
    reference: str
    state: list                      # state tensor names, each starting at zero
    defaults: dict                   # hyperparameter symbol -> default value (eta included)
    assignments: list
    state_latex: dict = field(default_factory=dict)
    tensors: dict = field(default_factory=dict)

    def __post_init__(self):
        self.tensors = {"theta": THETA, "g": GRAD}
        for s in self.state:
            self.tensors[s] = Tensor(s, (N,), role="hidden", latex=self.state_latex.get(s, s))
        if eta not in self.defaults:
            raise SpecError(f"optimizer {self.name}: the learning rate eta needs a default")
        allowed = {"theta", "g", *self.state}
        for target, body in self.assignments:
            if target not in allowed - {"g"}:
                raise SpecError(f"optimizer {self.name}: cannot assign {target!r}")
            for r in sp.sympify(body).atoms(sp.Indexed):
                if str(r.base.label) not in allowed or tuple(r.indices) != (I,):
                    raise SpecError(f"optimizer {self.name}: {r} is not an elementwise read of "
                                    f"θ, g or a state ({', '.join(self.state) or 'none'})")
            extra = sp.sympify(body).free_symbols - set(self.defaults) - {STEP, I}
            extra = {s for s in extra if not isinstance(s, sp.Indexed) and s.name not in allowed}
            if extra:
                raise SpecError(f"optimizer {self.name}: symbols {sorted(map(str, extra))} have no "
                                f"default value")

    @property
    def hyperparameters(self) -> list:
        """Hyperparameter symbols in a fixed order (the learning rate first)."""
        return [eta] + sorted((s for s in self.defaults if s != eta), key=lambda s: s.name)

    def read(self, name):
        return self.tensors[name][I]

    def equations(self) -> list[Equation]:
        """The assignments as equations in single-assignment form: the k-th assignment to X
        defines ``X__k``, and later reads of X read it. The last version of each is the new value."""
        version: dict = {}
        tensors = dict(self.tensors)
        out = []
        for k, (target, body) in enumerate(self.assignments):
            body = sp.sympify(body).xreplace(
                {self.read(n): tensors[version[n]][I] for n in version})
            new = f"{target}__{k}"
            tensors[new] = Tensor(new, (N,), role="hidden", latex=self.tensors[target].latex)
            version[target] = new
            out.append(Equation(tensors[new], (I,), body, layer=f"optimizer:{self.name}",
                                note=f"update of {target}"))
        self._versions = version
        self._all_tensors = tensors
        return out

    def final_versions(self) -> dict:
        """target name -> name of the tensor holding its new value."""
        self.equations()
        return dict(self._versions)

    def config(self, values: dict) -> dict:
        return {"name": self.name, **{s.name: float(values[s]) for s in self.hyperparameters}}


def _rule(name, title, reference, state, defaults, assignments, state_latex=None):
    return UpdateRule(name, title, reference, list(state), dict(defaults), list(assignments),
                      dict(state_latex or {}))


theta, g = THETA[I], GRAD[I]
_v, _m, _s, _G = (Tensor(n, (N,))[I] for n in ("v", "m", "s", "G"))

RULES = {
    "sgd": _rule("sgd", "stochastic gradient descent", "Robbins & Monro (1951)", [],
                 {eta: 0.1}, [("theta", theta - eta * g)]),
    "momentum": _rule("momentum", "gradient descent with momentum",
                      "Polyak (1964); Sutskever et al. (2013), eq. (1)-(2)", ["v"],
                      {eta: 0.01, mu: 0.9},
                      [("v", mu * _v - eta * g), ("theta", theta + _v)]),
    "nesterov": _rule("nesterov", "Nesterov accelerated gradient",
                      "Nesterov (1983); in the form of Bengio et al. (2013), eq. (7)", ["v"],
                      {eta: 0.01, mu: 0.9},
                      [("v", mu * _v - eta * g), ("theta", theta + mu * _v - eta * g)]),
    "adagrad": _rule("adagrad", "Adagrad", "Duchi, Hazan & Singer (2011)", ["G"],
                     {eta: 0.01, epsilon: 1e-10},
                     [("G", _G + g ** 2), ("theta", theta - eta * g / (sp.sqrt(_G) + epsilon))]),
    "rmsprop": _rule("rmsprop", "RMSProp", "Tieleman & Hinton (2012), lecture 6.5", ["s"],
                     {eta: 0.001, rho: 0.9, epsilon: 1e-8},
                     [("s", rho * _s + (1 - rho) * g ** 2),
                      ("theta", theta - eta * g / (sp.sqrt(_s) + epsilon))]),
    "adam": _rule("adam", "Adam", "Kingma & Ba (2015), Algorithm 1", ["m", "v"],
                  {eta: 0.001, beta1: 0.9, beta2: 0.999, epsilon: 1e-8},
                  [("m", beta1 * _m + (1 - beta1) * g),
                   ("v", beta2 * _v + (1 - beta2) * g ** 2),
                   ("theta", theta - eta * (_m / (1 - beta1 ** STEP))
                    / (sp.sqrt(_v / (1 - beta2 ** STEP)) + epsilon))]),
    "adamw": _rule("adamw", "AdamW (Adam with decoupled weight decay)",
                   "Loshchilov & Hutter (2019), Algorithm 2", ["m", "v"],
                   {eta: 0.001, beta1: 0.9, beta2: 0.999, epsilon: 1e-8, lam: 0.01},
                   [("m", beta1 * _m + (1 - beta1) * g),
                    ("v", beta2 * _v + (1 - beta2) * g ** 2),
                    ("theta", theta - eta * ((_m / (1 - beta1 ** STEP))
                                             / (sp.sqrt(_v / (1 - beta2 ** STEP)) + epsilon)
                                             + lam * theta))]),
}
HYPER_NAMES = {"lr": eta, "momentum": mu, "rho": rho, "beta1": beta1, "beta2": beta2,
               "eps": epsilon, "weight_decay": lam}


def get_rule(name) -> UpdateRule:
    if isinstance(name, UpdateRule):
        return name
    key = str(name).lower()
    if key not in RULES:
        raise SpecError(f"unknown optimizer {name!r}; known: {', '.join(RULES)}")
    return RULES[key]


# -- what the engine derives about a rule ---------------------------------------------------------------
def moving_average(rule: UpdateRule, state: str):
    """If ``state ← a·state + b·f(g)`` (a, b free of θ, g and states), return (a, b·f(g)), else None."""
    for target, body in rule.assignments:
        if target != state:
            continue
        s = rule.read(state)
        body = sp.expand(body)
        a = body.coeff(s)
        rest = sp.simplify(body - a * s)
        if a == 0 or a.free_symbols & {s} or rest.has(s) or any(
                rest.has(rule.read(o)) for o in rule.state) or rest.has(THETA[I]):
            return None
        return sp.factor(a), rest
    return None


def constant_gradient_solution(rule: UpdateRule, state: str):
    """Closed form of an averaged state after t steps from zero with a constant gradient g, or None.

    Solved by SymPy's ``rsolve`` from the declared recurrence, not written down per optimiser.
    """
    ma = moving_average(rule, state)
    if ma is None:
        return None
    a, rest = ma
    f = sp.Function("s")
    k = sp.Symbol("k", integer=True, nonnegative=True)
    sol = sp.rsolve(f(k + 1) - a * f(k) - rest, f(k), {f(0): 0})
    return sp.simplify(sol.subs(k, STEP)) if sol is not None else None


def step_at(rule: UpdateRule, t=None, states=None, grad=None):
    """θ's new value after one application of the rule, as an expression of θ, g and the
    hyperparameters, with the states' old values given by ``states`` (name -> expression, default
    the zero they start from), ``grad`` substituted for g and ``t`` for the step."""
    env = {n: sp.S.Zero for n in rule.state}
    env.update(states or {})
    if grad is not None:
        env["g"] = grad
    for target, body in rule.assignments:
        body = sp.sympify(body).xreplace({rule.read(n): v for n, v in env.items()})
        if t is not None:
            body = body.subs(STEP, t)
        env[target] = body
    return env["theta"]
