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


# -- explanations, generated from the declarations -----------------------------------------------------
def _printer(rule: UpdateRule):
    from .printing import IndexPrinter
    names = {s: HYPER_LATEX[s.name] for s in rule.defaults}
    names[STEP] = "t"
    return IndexPrinter(rule.tensors, symbol_names=names)


def _tex(rule, expr) -> str:
    return _printer(rule).doprint(expr)


def _correction_factors(rule: UpdateRule) -> list:
    """Factors ``1/(…t…)`` in θ's update: the step-dependent rescalings the rule declares."""
    body = dict(rule.assignments)["theta"]
    out = []
    for p in sp.preorder_traversal(body):
        if isinstance(p, sp.Pow) and p.exp == -1 and p.base.has(STEP) and p.base not in out \
                and not p.base.atoms(sp.Indexed):
            out.append(p.base)
    return out


def explain_optimizer(rule) -> "Explanation":
    """The rule's equations, its hyperparameters, and what the engine derives about it: the closed
    form of each moving-average state under a constant gradient, and what its step-dependent
    factors (Adam's bias correction) do to the step."""
    from .explain import Bullets, Display, Explanation, Heading, Para
    rule = get_rule(rule)
    doc = Explanation(f"Optimiser: {rule.title}")
    tex = lambda e: _tex(rule, e)                                    # noqa: E731
    doc.add(Para(f"Declared once as elementwise assignments over a parameter element "
                 f"$\\theta_i$, its gradient $g_i = \\partial C / \\partial \\theta_i$"
                 + (f" and the state {', '.join('$' + rule.tensors[s].latex + '_i$' for s in rule.state)}"
                    f" (each starting at 0)" if rule.state else "")
                 + f", run in order at every step $t = 1, 2, \\dots$ ({rule.reference})."))
    for target, body in rule.assignments:
        doc.add(Display(f"{tex(rule.read(target))} \\leftarrow {tex(body)}"))
    doc.add(Bullets([f"${tex(s)}$ = {v:g}" + (" (the learning rate)" if s == eta else "")
                     for s, v in sorted(rule.defaults.items(), key=lambda kv: kv[0] != eta)]))
    averaged = {}
    for st in rule.state:
        sol = constant_gradient_solution(rule, st)
        if sol is None:
            continue
        averaged[st] = sol
        s_t = sp.Symbol(rule.tensors[st].latex + "_{i,t}")
        doc.add(Heading(2, f"The state ${rule.tensors[st].latex}$ under a constant gradient"))
        doc.add(Para(f"Its update is linear in ${rule.tensors[st].latex}_i$. With $g_i$ held "
                     f"constant and ${rule.tensors[st].latex}_{{i,0}} = 0$, the recurrence solves "
                     f"(SymPy's rsolve on the declared assignment) to"))
        doc.add(Display(f"{tex(s_t)} = {tex(sol)}"))
    factors = _correction_factors(rule)
    if averaged and factors:
        with_c = sp.simplify(step_at(rule, states={}, grad=None).xreplace({}))
        const = {}
        for st, sol in averaged.items():
            # θ's update reads the state's new value, i.e. the closed form at step t
            const[st] = sol
        def theta_step(keep):
            env = dict(const)
            body = dict(rule.assignments)["theta"]
            if not keep:
                body = body.xreplace({f: sp.S.One for f in factors})
            body = body.xreplace({rule.read(n): v for n, v in env.items()})
            return sp.simplify(body.subs(sp.sqrt(g ** 2), sp.Abs(g)))
        corrected, raw = theta_step(True), theta_step(False)
        corrected, raw = sp.simplify(corrected - THETA[I]), sp.simplify(raw - THETA[I])
        del with_c
        doc.add(Heading(2, "Bias correction"))
        doc.add(Para("Each average is its target times a factor $1 - \\beta^{t}$ that is small in "
                     "the first steps, because the state starts at zero. The update divides by "
                     + ", ".join(f"${tex(f)}$" for f in factors)
                     + ", so with a constant gradient the step is, for every $t$,"))
        doc.add(Display(f"\\Delta {tex(THETA[I])} = {tex(corrected)}"))
        doc.add(Para("Without those factors the same substitution gives a step that depends on "
                     "$t$ (at $t = 1$ it is scaled by the ratio of the two factors):"))
        doc.add(Display(f"\\Delta {tex(THETA[I])} = {tex(raw)}"))
    return doc


def explain_decoupled_decay(coupled="adam", decoupled="adamw") -> "Explanation":
    """Why AdamW's decay is not L2 in the loss: both derived, on the first step and in general."""
    from .explain import Display, Explanation, Heading, Para
    a, w = get_rule(coupled), get_rule(decoupled)
    tex = lambda e: _tex(w, e)                                       # noqa: E731
    doc = Explanation(f"{w.title} versus L2 in the loss")
    th = THETA[I]
    penalty = lam / 2 * th ** 2
    grad_pen = sp.diff(penalty, th)
    doc.add(Para(f"L2 in the loss adds ${tex(penalty)}$ per parameter to the cost; its derivative "
                 f"adds ${tex(grad_pen)}$ to the gradient, so {a.title} sees "
                 f"$g_i + {tex(grad_pen)}$ and the decay passes through the moving averages and the "
                 f"division by $\\sqrt{{\\hat v}}$. {w.title} instead declares the decay outside "
                 f"the adaptive step:"))
    doc.add(Display(f"{tex(th)} \\leftarrow {tex(dict(w.assignments)['theta'])}"))
    l2 = step_at(a, t=1, grad=g + grad_pen)
    dec = step_at(w, t=1)
    fix = lambda e: sp.simplify(e.subs(sp.sqrt((g + grad_pen) ** 2), sp.Abs(g + grad_pen))  # noqa: E731
                                .subs(sp.sqrt(g ** 2), sp.Abs(g)))
    l2, dec = fix(l2 - th), fix(dec - th)
    doc.add(Heading(2, "The first step, derived from both declarations"))
    doc.add(Para(f"{a.title} with L2 in the loss ($t = 1$, states from zero):"))
    doc.add(Display(f"\\Delta {tex(th)} = {tex(l2)}"))
    doc.add(Para(f"{w.title}:"))
    doc.add(Display(f"\\Delta {tex(th)} = {tex(dec)}"))
    l2_0, dec_0 = sp.simplify(l2.subs(g, 0)), sp.simplify(dec.subs(g, 0))
    doc.add(Para("They differ. Where the gradient of the data term vanishes ($g_i = 0$), the two "
                 "steps are"))
    doc.add(Display(f"\\Delta {tex(th)}\\big|_{{\\mathrm{{L2}}}} = {tex(l2_0)}, \\qquad "
                    f"\\Delta {tex(th)}\\big|_{{\\mathrm{{decoupled}}}} = {tex(dec_0)}"))
    doc.add(Para(f"With L2 the decay is normalised together with the gradient: the whole step is "
                 f"at most $\\eta$ in size however large ${tex(lam * th)}$ is, and a weight with a "
                 f"large gradient history is decayed less. Decoupled, every weight shrinks by the "
                 f"same fraction $\\eta\\lambda$ per step."))
    return doc


def numpy_update(rule) -> "callable":
    """The declared assignments as one NumPy function ``update(theta, g, state, values, t)``
    (``state`` a dict of arrays updated in place, ``values`` hyperparameter name -> value), made by
    ``sympy.lambdify`` from the same equations the code generator lowers: the unfused path."""
    rule = get_rule(rule)
    names = ["theta", "g", *rule.state]
    plain = {rule.read(n): sp.Symbol(f"_{n}") for n in names}
    args = [plain[rule.read(n)] for n in names] + rule.hyperparameters + [STEP]
    steps = [(target, sp.lambdify(args, sp.sympify(body).xreplace(plain), modules="numpy"))
             for target, body in rule.assignments]

    def update(theta, g, state, values, t):
        env = {"theta": theta, "g": g, **state}
        hyper = [values[h.name] for h in rule.hyperparameters]
        for target, fn in steps:
            env[target] = fn(*[env[n] for n in names], *hyper, t)
        theta[...] = env["theta"]
        for s in rule.state:
            state[s][...] = env[s]
    return update
