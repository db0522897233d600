"""The concepts guide: the material a neural-network course teaches, in its order, with every formula
derived by the engine while the guide is built (nothing here is a formula typed by hand: the prose
says what to look at, the equations come from small models declared below and derived on the spot).

Each section has a runnable snippet (``SNIPPETS``, also executed by the tests) and, where the
experiments have been run (``chainrule experiment overfitting|vanishing|vanishing-through-time``), their
plots; the committed site shows the runs committed in ``docs/experiments``.
"""
from __future__ import annotations

from pathlib import Path
import shutil

import sympy as sp

from ..derive import build_model, derive
from ..derive.explain import Bullets, Code, Display, Explanation, Figure, Heading, Para, Writer
from ..derive.layers import ActivityRegularization, Dense, Dropout, GaussianNoise, sequential

# the snippet of each section: short, quick, runnable as is (tests/test_docs_site.py runs them)
SNIPPETS = {
    "perceptron": '''\
from chainrule.derive import build_model
model = build_model("2 -> dense(1) -> bce_logits")      # the built-in "perceptron"
for eq in model.equations:
    print(eq.out.name, "=", eq.body)''',
    "cost": '''\
from chainrule.derive import build_model, explain_model
model = build_model("perceptron")
print(explain_model(model).to_markdown().split("## Backward")[0])   # forward pass, loss and cost''',
    "descent": '''\
import numpy as np
from chainrule.runtime import Network
from chainrule.runtime.data import make_moons
from chainrule.runtime.optim import SGD
x, y = make_moons(200, noise=0.2, seed=0)
for lr in (0.01, 0.5, 50.0):                 # too small, about right, too large
    net = Network("2 -> dense(16) -> tanh -> dense(2) -> softmax_cross_entropy", optimizer=SGD(lr), seed=0)
    h = net.fit(x, y, epochs=20, progress=False)
    print(lr, h["loss"][0], h["loss"][-1])''',
    "backprop": '''\
from chainrule.derive import build_model, derive
grads = derive(build_model("demo"))
for name in ("z2", "z1", "W1"):
    print(grads.composed[name].equation)      # delta(2), delta(1) from delta(2), and dC/dW(1)''',
    "activations": '''\
from chainrule.derive import build_model, derive
for act in ("sigmoid", "tanh", "relu"):
    grads = derive(build_model(f"3 -> dense(4) -> {act} -> dense(2) -> mse"))
    print(act, grads.composed["z1"].equation)''',
    "losses": '''\
from chainrule.derive import build_model, derive
for loss in ("mse", "mae", "softmax_cross_entropy"):
    print(loss, derive(build_model(f"4 -> dense(3) -> {loss}")).composed["z1"].equation)''',
    "regularisers": '''\
from chainrule.derive import Dense, sequential, derive
model = sequential(3, [Dense(2, l2=0.01)], "mse")
print(model.equation_for("C").body)          # the cost: mean loss + lambda/2 sum(W**2)
print(derive(model).composed["W1"].equation)  # its gradient: the data term + lambda W''',
    "vanishing": '''\
from chainrule.derive import build_model, derive
spec = "3 -> dense(3) -> sigmoid -> dense(3) -> sigmoid -> dense(3) -> sigmoid -> dense(1) -> mse"
print(derive(build_model(spec)).composed["z1"].equation)   # one sigmoid' per layer between z1 and the loss''',
    "cnn": '''\
from chainrule.derive import build_model, derive, explain_model
model = build_model("6x6 -> conv(2, 3) -> relu -> maxpool(2) -> flatten -> dense(3) -> softmax_cross_entropy")
print(derive(model, wrt=["x"]).composed["x"].equation)     # the input gradient: a full correlation''',
    "rnn": '''\
from chainrule.derive import build_model, derive
grads = derive(build_model("seq(4, 3) -> rnn(5) -> dense(2) -> mse"))
print(grads.composed["z1"].equation)       # reads d_z1 at t + 1: backpropagation through time''',
}


class Guide:
    """Builds the guide's blocks; each formula is printed from a model the engine derived."""

    def __init__(self):
        self.doc = Explanation("Concepts: a course in backpropagation, derived")
        self._cache = {}

    def model(self, spec_or_model, wrt=()):
        key = (spec_or_model if isinstance(spec_or_model, str) else id(spec_or_model), tuple(wrt))
        if key not in self._cache:
            model = build_model(spec_or_model) if isinstance(spec_or_model, str) else spec_or_model
            grads = derive(model, wrt=list(wrt))
            self._cache[key] = (model, grads, Writer(model, grads))
        return self._cache[key]

    def add(self, *blocks):
        self.doc.add(*blocks)

    def forward(self, spec, name, matrix=False):
        model, _, w = self.model(spec)
        eq = model.equation_for(name)
        self.add(Display(w.equation(eq)), *(w.matrix_blocks(eq) if matrix else []))

    def adjoint(self, spec, name, steps=False, matrix=False, wrt=()):
        model, grads, w = self.model(spec, wrt)
        d = grads.composed[name]
        self.add(*(w.steps(d) if steps and d.steps else [Display(w.equation(d.equation))]))
        self.add(*w.patterns(d.equation))
        if matrix:
            self.add(*w.matrix_blocks(d.equation))

    def snippet(self, key):
        self.add(Para("Run it:"), Code(SNIPPETS[key]))


def _figure(guide, experiments, name, caption, figure_dir, prefix):
    """The experiment's plot where it has been run; otherwise the command that makes it."""
    src = Path(experiments) / f"{name}.png" if experiments else None
    if src is not None and src.is_file():
        dst = Path(figure_dir) / f"{name}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        guide.add(Figure(f"{prefix}{name}.png", caption))
    else:
        guide.add(Para(f"The experiment `chainrule experiment {name}` plots this; build the docs with "
                       f"`--experiments DIR` (its output folder) to show its plot here."))


def concepts_doc(experiments=None, figure_dir="figures", figure_prefix="figures/") -> Explanation:
    g = Guide()
    fig = lambda name, caption: _figure(g, experiments, name, caption, figure_dir, figure_prefix)  # noqa: E731
    g.add(Para("Each section below states an idea and shows the formulas chainrule derives for it, from "
               "small models declared for the purpose. The notation is the one of every model page: "
               "$C$ the cost, $\\ell_b$ the loss of example $b$, $\\delta^{(l)}$ the adjoint of the "
               "pre-activation $z^{(l)}$ of layer $l$."))

    perceptron = "2 -> dense(1) -> bce_logits"
    g.add(Heading(1, "1. The perceptron and its forward pass"))
    g.add(Para("A perceptron weighs its inputs, adds a bias, and passes the sum through a nonlinearity. "
               "chainrule declares it as one equation per example $b$ and output $o$:"))
    g.forward(perceptron, "z1", matrix=True)
    g.add(Para("With a sigmoid on top, the output reads as the probability of the positive class:"))
    g.forward(perceptron, g.model(perceptron)[0].outputs[0].name)
    g.snippet("perceptron")

    g.add(Heading(1, "2. Loss versus cost"))
    g.add(Para("The *loss* $\\ell_b$ scores one example; the *cost* $C$ is what training minimises: "
               "here the mean of the losses over the batch of $B$ examples. For the perceptron "
               "(binary cross-entropy on the logit):"))
    g.forward(perceptron, g.model(perceptron)[0].loss.name)
    g.forward(perceptron, "C")
    g.snippet("cost")

    from ..derive.optimizers import explain_optimizer
    g.add(Heading(1, "3. Gradient descent and the learning rate"))
    g.add(Para("Gradient descent moves every parameter against its gradient, scaled by the learning "
               "rate $\\eta$. The update, as chainrule declares it and fuses into the training kernel:"))
    g.add(*[b for b in explain_optimizer("sgd").blocks if isinstance(b, Display)])
    g.add(Para("The gradient it needs, for the perceptron's weights, derived:"))
    g.adjoint(perceptron, "W1")
    g.add(Para("Too small a learning rate crawls; too large a one overshoots and the cost grows. The "
               "snippet trains the same network with three rates and prints the first and last loss."))
    g.snippet("descent")

    demo = "demo"
    g.add(Heading(1, "4. Backpropagation"))
    g.add(Para("Backpropagation is the chain rule applied from the cost backwards: the adjoint of each "
               "tensor is the sum, over everything that reads it, of the upstream adjoint times the local "
               "derivative. For the demo network (sigmoid hidden layer, softmax with cross-entropy), the "
               "engine derives the output error step by step:"))
    g.adjoint(demo, "z2", steps=True)
    g.add(Para("then passes it down one layer, through the transposed weights and the derivative of the "
               "activation (the recursion for $\\delta^{(1)}$):"))
    g.adjoint(demo, "z1", matrix=True)
    g.add(Para("and each weight gradient is an outer product of an adjoint with the layer's input:"))
    g.adjoint(demo, "W1", matrix=True)
    g.snippet("backprop")

    g.add(Heading(1, "5. Activations"))
    g.add(Para("An activation enters the backward pass through its derivative, which the engine rewrites "
               "in terms of what the forward pass computed (the recorded steps say which rule it used). "
               "For a hidden layer $a^{(1)} = f(z^{(1)})$ followed by a dense layer:"))
    for act in ("sigmoid", "tanh", "relu"):
        spec = f"3 -> dense(4) -> {act} -> dense(2) -> mse"
        g.add(Heading(2, act))
        g.forward(spec, "a1")
        g.adjoint(spec, "z1")
    g.add(Heading(2, "softmax"))
    g.add(Para("Softmax turns scores into probabilities, in its stable form with the log-sum-exp; with "
               "the cross-entropy after it, the output error collapses to probabilities minus targets:"))
    g.forward("4 -> dense(3) -> softmax -> cross_entropy", "p1")
    g.adjoint("4 -> dense(3) -> softmax -> cross_entropy", "z1")
    g.snippet("activations")

    g.add(Heading(1, "6. Losses"))
    g.add(Para("Each loss and the output error it produces on a linear output layer, derived:"))
    for loss, spec in (("mean squared error", "4 -> dense(3) -> mse"), ("mean absolute error", "4 -> dense(3) -> mae"),
                       ("cross-entropy on softmax", "4 -> dense(3) -> softmax_cross_entropy"),
                       ("negative log-likelihood with log-softmax", "4 -> dense(3) -> log_softmax -> nll")):
        g.add(Heading(2, loss))
        model = g.model(spec)[0]
        g.forward(spec, model.loss.name)
        g.adjoint(spec, "z1")
    g.snippet("losses")

    g.add(Heading(1, "7. Under- and overfitting, and each regulariser"))
    g.add(Para("A model too small for its data underfits: both training and validation error stay high. "
               "One with capacity to spare fits the noise of its training set and overfits: the training "
               "error keeps falling while the validation error rises. Regularisers trade a little "
               "training error for a smaller gap; each is a term of the cost or a random tensor, so its "
               "effect on the gradient is derived like everything else."))
    fig("overfitting", "Training vs validation error as capacity grows, then with L2, dropout and early stopping.")
    l2 = sequential(3, [Dense(2, l2=0.01)], "mse", name="l2")
    l1 = sequential(3, [Dense(2, l1=0.01)], "mse", name="l1")
    g.add(Heading(2, "L2 weight decay"), Para("The cost gains $\\frac{\\lambda}{2}\\sum W^2$; its gradient gains $\\lambda W$:"))
    g.forward(l2, "C")
    g.adjoint(l2, "W1")
    g.add(Heading(2, "L1"), Para("The cost gains $\\lambda \\sum |W|$; its gradient, $\\lambda$ times the sign:"))
    g.forward(l1, "C")
    g.adjoint(l1, "W1")
    drop = sequential(3, [Dense(4), Dropout(0.25), Dense(2)], "mse", name="dropout")
    g.add(Heading(2, "Dropout"), Para("A random mask $m$ zeroes units in training and rescales the "
                                     "survivors; the adjoint passes through the same mask:"))
    g.forward(drop, "a1")
    g.adjoint(drop, "z1")
    noise = sequential(3, [GaussianNoise(0.1), Dense(2)], "mse", name="noise")
    g.add(Heading(2, "Input noise"), Para("Noise added to the input changes what the weights see, not "
                                          "the form of their gradient:"))
    g.forward(noise, "a")
    act = sequential(3, [Dense(4), ActivityRegularization(l2=0.01), Dense(2)], "mse", name="activity")
    g.add(Heading(2, "Activity regularisation"), Para("A penalty on a layer's outputs adds to the "
                                                      "adjoint of those outputs:"))
    g.forward(act, "C")
    g.adjoint(act, "z1")
    mn = sequential(3, [Dense(2, max_norm=2.0)], "mse", name="max-norm")
    g.add(Heading(2, "Max-norm"), Para("Not a term of the cost but a projection after each update:"))
    mw = g.model(mn)[2]
    for eq in mn.constraints:
        param = mn.tensors[eq.out.meta["param"]]
        g.add(Display(f"{mw.tex(param[eq.indices])} \\leftarrow {mw.tex(eq.body)}"))
    g.add(Heading(2, "Early stopping"), Para("Training stops when the validation error has not improved "
                                             "for a number of epochs, and the best parameters are restored "
                                             "(`EarlyStopping(patience=..)`): no formula, a rule on the curve above."))
    g.snippet("regularisers")

    deep = "3 -> dense(3) -> sigmoid -> dense(3) -> sigmoid -> dense(3) -> sigmoid -> dense(1) -> mse"
    g.add(Heading(1, "8. Vanishing gradients and residual connections"))
    g.add(Para("In a deep sigmoid network the recursion multiplies, layer after layer, by the sigmoid's "
               "derivative. For three sigmoid layers, the adjoint of the first pre-activation:"))
    g.adjoint(deep, "z1")
    a = sp.Symbol("a")
    peak = sp.maximum(a * (1 - a), a, sp.Interval(0, 1))
    g.add(Para(f"Each factor $a(1-a)$ is at most ${sp.latex(peak)}$ (its maximum over $0 \\le a \\le 1$, "
               f"found by SymPy), so through $L$ layers the adjoint shrinks like "
               f"${sp.latex(peak)}^{{L}}$ unless the weights compensate."))
    g.snippet("vanishing")
    fig("vanishing", "Per-layer gradient norms: deep sigmoid vs ReLU vs residual blocks.")
    res = "3 -> dense(3) -> residual(dense(3) -> relu -> dense(3)) -> dense(1) -> mse"
    model, grads, w = g.model(res)
    g.add(Para("A residual connection $r = x + f(x)$ adds an identity path. The adjoint of its input is "
               "the sum of one term per use, and the identity's term passes the adjoint on unchanged:"))
    for name, d in grads.derivations.items():
        if len(d.contributions) >= 2:
            g.add(Display(w.equation(d.equation)), *w.contributions(d))
            break

    cnn = "6x6 -> conv(2, 3) -> relu -> maxpool(2) -> flatten -> dense(3) -> softmax_cross_entropy"
    g.add(Heading(1, "9. Convolutional networks"))
    g.add(Para("A convolution slides one small kernel over the image: the same weights at every "
               "position. The forward equation, then the gradients the engine derives: the kernel's "
               "(a correlation of the input with the adjoint) and the input's (a full correlation of the "
               "adjoint with the flipped kernel); max pooling routes the adjoint to each window's maximum."))
    g.forward(cnn, "y1")
    g.adjoint(cnn, "W1")
    g.adjoint(cnn, "x", wrt=["x"])
    g.forward(cnn, "m1")
    g.snippet("cnn")

    _recurrent_section(g, fig)
    return g.doc


RNN_SPEC = "seq(4, 3) -> rnn(5) -> dense(2) -> mse"


def _recurrent_section(g: Guide, fig):
    """Recurrent networks: Elman's layer derived here; every recurrent layer of the registry listed."""
    from . import catalog
    rnns = [e for e in catalog.layers() if any(k in e.slug for k in ("rnn", "lstm", "gru"))]
    g.add(Heading(1, "10. Recurrent networks"))
    if not any(e.slug == "rnn" for e in rnns):
        g.add(Para("chainrule has no recurrent layer built in yet; when one is declared, its derivation "
                   "(backpropagation through time: the adjoint runs backward over $t$) appears here."))
        return
    model, grads, w = g.model(RNN_SPEC)
    g.add(Para("A recurrent layer reads its own previous state at $t-1$. Elman's layer, declared as two "
               "equations over the time index $t$:"))
    for eq in model.equations:
        if "rnn(" in eq.layer and eq.out.rank == 3:      # its state equations, over (b, t, o)
            g.add(Display(w.equation(eq)))
    g.add(Para("Its adjoint reads the adjoint at $t+1$: it runs backward in time (backpropagation "
               "through time), and the output's error enters at the last step only:"))
    g.adjoint(RNN_SPEC, "z1")
    g.add(Para("The recurrent weights collect one term per step, each pairing the adjoint at $t$ with "
               "the state at $t-1$:"))
    g.adjoint(RNN_SPEC, "U1")
    g.add(Para("Going back one step multiplies the adjoint by the transposed recurrent weights and by "
               "the derivative of tanh, at most one (the first adjoint above): over many steps the product "
               "shrinks (or grows) geometrically, the vanishing gradient through time. An LSTM's cell passes "
               "its adjoint back through an elementwise product with the forget gate instead: at "
               "initialisation (the gate near one half) that path vanishes too, but a forget gate held open "
               "carries the adjoint back to the first step, as the norms below (MNIST-1D) show:"))
    fig("vanishing_through_time", "Mean norm of the adjoint of h_t against t: an Elman RNN and an LSTM.")
    g.add(Para("Each recurrent layer has its page: " + ", ".join(f"{e.title} (`layers/{e.slug}.html`)" for e in rnns)
               + "."))
    g.snippet("rnn")
