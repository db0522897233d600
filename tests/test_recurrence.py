"""Recurrences over time: declared the natural way, derived with a symbolic T into the BPTT recursion,
verified exactly at several sizes (T included), and refused clearly where they are not causal."""
import functools
import re

import numpy as np
import pytest
import sympy as sp

from chainrule.derive import Equation, Model, Tensor, derive, indices, size
from chainrule.derive.errors import ShapeError, UnsupportedError
from chainrule.derive.recurrence import Delayed, TimeLoop, recurrent
from chainrule.derive.verify import check_claim, verify_model

B, T, n, m, k = (size(s) for s in "B T n m k".split())
b, t, o, i, j, q = indices("b t o i j q")


def elman(initial="zeros", lag=1):
    """H[b,t,o] = tanh(Σ_i W x[b,t,i] + Σ_j U H[b,t-lag,j] + c), a readout of the last step, squared
    error. The initial state: zeros, a learned parameter h0[o] or an input h0[b, o]."""
    x = Tensor("x", (B, T, n), role="input")
    W, U = Tensor("W", (m, n), role="param", init="glorot"), Tensor("U", (m, m), role="param", init="glorot")
    c, V = Tensor("c", (m,), role="param", init="glorot"), Tensor("V", (k, m), role="param", init="glorot")
    H = Tensor("H", (B, T, m), layer="rnn")
    extra, init = [], 0
    if initial == "param":
        init = Tensor("h0", (m,), role="param", init="glorot")
        extra = [init]
    elif initial == "input":
        init = Tensor("h0", (B, m), role="input")
        extra = [init]
    recurrent(H, 1, init)
    y, z = Tensor("y", (B, k), role="target"), Tensor("z", (B, k))
    loss, C = Tensor("l", (B,), role="loss"), Tensor("C", (), role="cost")
    eqs = [Equation(H, (b, t, o), sp.tanh(sp.Sum(W[o, i] * x[b, t, i], (i, 0, n - 1))
                                          + sp.Sum(U[o, j] * H[b, t - lag, j], (j, 0, m - 1)) + c[o]), layer="rnn"),
           Equation(z, (b, q), sp.Sum(V[q, o] * H[b, T - 1, o], (o, 0, m - 1)), layer="out"),
           Equation(loss, (b,), sp.Sum((z[b, q] - y[b, q]) ** 2, (q, 0, k - 1)), layer="loss"),
           Equation(C, (), sp.Sum(loss[b], (b, 0, B - 1)) / B, layer="cost")]
    return Model(eqs, [x, W, U, c, H, V, y, z, loss, C, *extra], C, loss=loss, outputs=[z],
                 size_values={n: 3, m: 4, k: 2, T: 5}, name="elman" if lag == 1 else f"elman-lag{lag}")


def test_the_natural_recurrence_is_a_time_loop_with_its_initial_state():
    model = elman()
    loop = model.schedule[0]
    assert isinstance(loop, TimeLoop) and loop.direction == 1 and loop.names == ["H"]
    delayed, = model.equations[0].body.atoms(Delayed)
    initial, read, when = delayed.args
    assert initial == 0 and str(read.base.label) == "H" and when == t - 1


def test_bptt_is_derived_with_a_symbolic_sequence_length():
    model = elman()
    grads = derive(model)
    H = model.tensors["H"]
    dH, dz = grads.composed["H"].adjoint, grads.adjoints["z"]
    V, U = model.tensors["V"], model.tensors["U"]
    o2 = sp.Symbol("o'", integer=True)
    # δ_t receives the output's contribution at t = T-1 and h_{t+1}'s through the recurrence
    expected = (sp.Piecewise((sp.Sum(V[q, o] * dz[b, q], (q, 0, k - 1)), sp.Eq(t, T - 1)), (0, True))
                + sp.Piecewise((sp.Sum((1 - H[b, t + 1, o2] ** 2) * U[o2, o] * dH[b, t + 1, o2], (o2, 0, m - 1)),
                                T >= t + 2), (0, True)))
    eq = grads.composed["H"].equation
    assert eq.body == expected
    assert T in eq.body.free_symbols                        # the length stays a symbol
    # each weight's gradient sums over every time step
    dU = grads.composed["U"].equation.body
    assert isinstance(dU, sp.Sum) and [lim[0] for lim in dU.limits] == [b, t]
    assert dU.limits[1][1:] == (1, T - 1) and not dU.has(Delayed)     # h_{-1} = 0: the t = 0 term vanishes
    dW = grads.composed["W"].equation.body
    assert dW == sp.Sum((1 - H[b, t, o] ** 2) * dH[b, t, o] * model.tensors["x"][b, t, i], (b, 0, B - 1), (t, 0, T - 1))


def test_the_adjoint_runs_backward_in_time():
    from chainrule.derive.recurrence import schedule
    grads = derive(elman())
    units = schedule([d.equation for d in grads.composed.values()])
    loops = [u for u in units if isinstance(u, TimeLoop)]
    assert len(loops) == 1 and loops[0].direction == -1 and loops[0].names == ["d_H"]


@pytest.mark.parametrize("initial", ["zeros", "param"])
def test_bptt_verifies_exactly_at_several_sizes_including_T(initial):
    checks = verify_model(elman(initial), sizes=[{"B": 3, "T": 4, "k": 5, "m": 6, "n": 7},
                                                  {"B": 4, "T": 5, "k": 3, "m": 7, "n": 6}], points=1)
    names = {c.name.split("dC/d")[1] for c in checks}
    assert names == ({"U", "V", "W", "c"} | ({"h0"} if initial == "param" else set()))
    for c in checks:
        assert c and c.checked > 0, str(c)
        assert {s["T"] for s in c.sizes} == {4, 5}


def test_a_recurrence_two_steps_back_is_derived_and_verifies_at_several_sizes():
    """H reads H[t-2] (two interleaved chains): the adjoint reads δ[t+2], guarded by t + 3 <= T, and
    the recurrent weight's gradient starts at t = 2; exact at two size assignments, T included."""
    model = elman(lag=2)
    grads = derive(model)
    H, U = model.tensors["H"], model.tensors["U"]
    dH = grads.composed["H"].adjoint
    o2 = sp.Symbol("o'", integer=True)
    assert grads.composed["H"].equation.body.has(
        sp.Piecewise((sp.Sum((1 - H[b, t + 2, o2] ** 2) * U[o2, o] * dH[b, t + 2, o2], (o2, 0, m - 1)),
                      T >= t + 3), (0, True)))
    dU = grads.composed["U"].equation.body
    assert isinstance(dU, sp.Sum) and dU.limits[1] == (t, 2, T - 1)
    checks = verify_model(model, sizes=[{"B": 3, "T": 5, "k": 4, "m": 6, "n": 7},
                                        {"B": 4, "T": 6, "k": 3, "m": 5, "n": 7}], points=1)
    assert {c.name.split("dC/d")[1] for c in checks} == {"U", "V", "W", "c"}
    for c in checks:
        assert c and c.checked > 0, str(c)
        assert {s["T"] for s in c.sizes} == {5, 6}


def test_an_initial_state_given_as_an_input_verifies_exactly():
    """h0[b, o] an input (a state carried over from a previous batch): exact at two sizes; its own
    gradient is the adjoint the first steps send back (checked with wrt=)."""
    model = elman("input", lag=2)
    checks = verify_model(model, derive(model, wrt=["h0"]), points=1,
                          sizes=[{"B": 3, "T": 4, "k": 5, "m": 6, "n": 7}, {"B": 4, "T": 5, "k": 3, "m": 7, "n": 6}])
    assert {c.name.split("dC/d")[1] for c in checks} == {"U", "V", "W", "c", "h0"}
    for c in checks:
        assert c and c.checked > 0, str(c)


def test_truncated_backpropagation_is_not_the_gradient():
    """The claim that stops at one step (δ only from the output at T-1) is refuted with a counterexample."""
    model = elman()
    H, x, V = (model.tensors[s] for s in "H x V".split())
    dz = sp.IndexedBase("d_z", real=True)
    one_step = sp.Sum((1 - H[b, T - 1, o] ** 2) * x[b, T - 1, i] * sp.Sum(V[q, o] * dz[b, q], (q, 0, k - 1)),
                      (b, 0, B - 1))
    check = check_claim(model, "W", one_step, points=1)
    assert not check and "counterexample" in str(check)


def _one_layer(shift, declare=True, initial=0):
    U, x = Tensor("U", (m, m), role="param", init="glorot"), Tensor("x", (B, T, m), role="input")
    H = Tensor("H", (B, T, m), layer="rnn")
    if declare:
        recurrent(H, 1, initial)
    C = Tensor("C", (), role="cost")
    eqs = [Equation(H, (b, t, o), sp.tanh(x[b, t, o] + sp.Sum(U[o, j] * H[b, t + shift, j], (j, 0, m - 1))),
                    layer="rnn"),
           Equation(C, (), sp.Sum(H[b, T - 1, o], (b, 0, B - 1), (o, 0, m - 1)))]
    return Model(eqs, [U, x, H, C], C)


def test_a_read_of_the_future_is_refused():
    with pytest.raises(UnsupportedError, match=r"layer rnn: H reads H\[b, t \+ 1, j\] at t\+1, the future, "
                                               r"in a causal recurrence"):
        _one_layer(+1)


def test_a_recurrence_without_an_initial_state_is_refused():
    with pytest.raises(UnsupportedError, match=r"layer rnn: H reads H\[b, t - 1, j\] at t-1, a recurrence, "
                                               r"but H \(B, T, m\) declares no initial state"):
        _one_layer(-1, declare=False)


def test_an_initial_state_of_the_wrong_shape_is_refused():
    with pytest.raises(ShapeError, match=r"layer rnn: the initial state h0 \(B, T, m\) of H \(B, T, m\) must "
                                         r"have the shape of one time step \(B, m\)"):
        _one_layer(-1, initial=Tensor("h0", (B, T, m), role="input"))


def test_a_cycle_within_one_time_step_is_refused():
    with pytest.raises(UnsupportedError, match="cycle through H -> H"):
        _one_layer(0)


# -- generated kernels -------------------------------------------------------------------------------------
def _numpy_elman(p, x, h0=None):
    """The Elman recurrence by hand (the independent reference)."""
    h = np.zeros((x.shape[0], p["U"].shape[0])) if h0 is None else np.broadcast_to(h0, (x.shape[0], h0.shape[-1]))
    for step in range(x.shape[1]):
        h = np.tanh(x[:, step] @ p["W"].T + h @ p["U"].T + p["c"])
    return h @ p["V"].T


@pytest.mark.parametrize("initial", ["zeros", pytest.param("param", marks=pytest.mark.slow)])
def test_kernels_loop_over_time_and_match_numpy_and_finite_differences(compiled_declared, initial):
    from chainrule.codegen.verify import check_gradients
    cm = compiled_declared(f"elman-{initial}", lambda: elman(initial))
    src = cm.source
    # one loop over t each way, the per-step contractions on BLAS, never an unrolled copy
    assert "for t1 in range(5):" in src and "in range(5 - 1, -1, -1):" in src
    # the state at t - 1 is the step before's result, carried (no copy out of the sequence)
    # (named t4_H_sm1i when it starts from a declared initial state)
    assert "_matmul(t4_H_sm1" in src and re.search(r"t4_H_sm1i? = t4_H_now", src) and "t4_H[:, 3" not in src
    assert "# time loop, backward in time (backpropagation through time): d_H" in src
    rng = np.random.default_rng(3)
    params = cm.init_params(seed=1)
    x, y = rng.normal(size=(6, 5, 3)), rng.normal(size=(6, 2))
    z = cm.predict(params, x)
    assert np.allclose(z, _numpy_elman(params, x, params.get("h0")), rtol=1e-12, atol=1e-12)
    for check in check_gradients(None, compiled=cm, batch=4):
        assert check.ok, str(check)


def _time_loops(function_source):
    """(the lines before, the body) of each ``for tN in range(...)`` loop of a generated function."""
    lines, out = function_source.splitlines(), []
    for k, line in enumerate(lines):
        if line.startswith("    for t") and " in range(" in line:
            body = []
            for inner in lines[k + 1:]:
                if inner.strip() and not inner.startswith("        "):
                    break
                body.append(inner)
            out.append((lines[:k], body))
    return out


def test_a_time_loop_keeps_only_what_needs_the_previous_step():
    """Lowered from the equations' shape: the input projection reads nothing the recurrence computes,
    so it is one GEMM over the whole sequence before the loop (x read in place as a (B·T) x n
    matrix), and the readout's adjoint, which does not depend on t, is computed once before the
    backward loop; each step keeps one _matmul, the recurrent one, and calls the vectorisable tanh."""
    from chainrule.codegen.render import render_module
    from chainrule.derive import build_model
    src = render_module(build_model("seq(6, 3) -> rnn(5) -> dense(2) -> softmax_cross_entropy"), "float32")
    lag = src[src.index("def loss_and_grads"):src.index("def train_step")]
    (before_fwd, forward), (before_bwd, backward) = _time_loops(lag)
    assert "_matmul(t0_x.reshape(((n_batch) * (6), (3)))" in "\n".join(before_fwd)
    assert "    # hoisted2[b,t,o] = Σ_i[W1[o, i]*x[b, t, i]] + b1[o]" in before_fwd
    # the recurrent weight transposed once before the loop: each step multiplies by a contiguous matrix
    assert sum("_matmul(" in ln for ln in forward) == 1 and "_matmul(t4_h1_sm1, t2_U1_T)" in "\n".join(forward)
    assert "    t2_U1_T = np.ascontiguousarray(t2_U1.T)" in before_fwd
    assert not any("np.ascontiguousarray" in ln for ln in forward)
    assert any("_tanh(" in ln for ln in forward) and not any("math.tanh" in ln for ln in forward)
    assert any(ln.strip().startswith("hoisted") and "= _matmul(t14_d_z2, t7_W2)" in ln for ln in before_bwd[-3:])
    # δ at t + 1 is the step before's result, carried: zeros before the first step, no copy in the loop
    assert before_bwd[-1].strip() == "t15_d_z1_sp1 = np.zeros((n_batch, 5), dtype=DT)"
    assert "t15_d_z1_sp1 = t15_d_z1_now  # d_z1 at this step, read by the next one" in "\n".join(backward)
    assert not any("ascontiguousarray" in ln for ln in backward)
    assert sum("_matmul(" in ln for ln in backward) == 1 and "t2_U1)" in "\n".join(backward)
    # the weight gradients: GEMMs after the backward loop, over the stored δ of every step; d_W1 one
    # product with x read in place, not a product per batch element, oriented so that it lands in
    # d_W1's own (o, i) order: δᵀ x, no transposing copy after it
    d_w1 = lag[lag.index("# d_W1[o,i] = "):lag.index("# d_W2[o,i] = ")]
    assert "_matmul(t15_d_z1.reshape(((n_batch) * (6), (5))).T, t0_x.reshape(((n_batch) * (6), (3))))" in d_w1
    assert sum("_matmul(" in ln for ln in d_w1.splitlines()) == 1 and "for " not in d_w1


@pytest.mark.slow
def test_kernels_of_a_recurrence_two_steps_back_from_an_input_state(compiled_declared):
    """H[t-2] with h0[b, o] an input: the step reads the slice two steps back (h0 for t < 2), and
    the kernels match the recurrence by hand and central differences."""
    from chainrule.codegen.verify import check_gradients
    cm = compiled_declared("elman-lag2-input", lambda: elman("input", lag=2))
    assert "t4_H[:, t1 - 2, :]" in cm.source and "# H at step t1-2 (the initial state before the start)" in cm.source
    rng = np.random.default_rng(4)
    params = cm.init_params(seed=2)
    x, h0 = rng.normal(size=(6, 5, 3)), rng.normal(size=(6, 4))
    h = [h0, h0]                                    # h_{-2}, h_{-1}
    for step in range(5):
        h.append(np.tanh(x[:, step] @ params["W"].T + h[-2] @ params["U"].T + params["c"]))
    assert np.allclose(cm.predict(params, [x, h0]), h[-1] @ params["V"].T, rtol=1e-12, atol=1e-12)
    for check in check_gradients(None, compiled=cm, batch=4):
        assert check.ok, str(check)


def test_the_explanation_says_backpropagation_through_time():
    from chainrule.derive import build_model, explain_model
    md = explain_model(build_model("seq(5, 3) -> rnn(4) -> dense(2) -> mse")).to_markdown()
    part = md[md.index("# Through time"):md.index("# The backward recursion")]
    assert "read their own past ($h^{(1)}$ starts from $0$ before the first step)" in part
    assert ("Backpropagation through time: the adjoint $\\delta^{(1)}$ at step $t$ receives what the layers "
            "above send at that step and, through the recurrence, what the next step $t + 1$ sends back") in part
    assert "${\\delta^{(1)}_{b,t + 1,o'}}$" in part                        # δ_{t+1}, read through U^T
    assert "each weight's gradient is a sum over the steps" in part
    # the weight gradient starts at t = 1: h_{-1} = 0 (a recorded step)
    assert "*initial state*: before t = 0 a recurrence holds its declared initial state" in md
    assert "1 \\leq t \\leq T_{0} - 1" in md


def test_the_bptt_recursion_in_matrix_form_with_shapes():
    """The explanation's matrix forms of one step (column vectors per example): the forward step
    reads h_{t-1}, δ_t = (1 - h_t²) ⊙ ([T ≥ t+2] Uᵀ δ_{t+1} + [t = T-1] W⁽²⁾ᵀ δ⁽²⁾), and ∂C/∂U =
    Σ_{t=1}^{T-1} Δ_tᵀ H_{t-1} over the batch. Each is checked against its index form here at sizes
    the engine did not use, at every step t (both branches of each bracket)."""
    from chainrule.derive import build_model, explain_model
    from chainrule.derive.matrix import check_sizes, random_env
    model = build_model("seq(5, 3) -> rnn(4) -> dense(2) -> mse")
    doc = explain_model(model)
    forms = {f.lhs: f for f in doc.matrix_forms}
    step = forms[r"z^{(1)}_{t}"]
    assert step.rhs == r"b^{(1)} + U^{(1)} h^{(1)}_{t - 1} + W^{(1)} x_{t}" and step.shape == "n_{1}"
    assert r"before the first step, $h^{(1)}_{t - 1}$ is the initial state $0$" in step.notes
    delta = forms[r"\delta^{(1)}_{t}"]
    assert delta.rhs == (r"\left(1 - \left(h^{(1)}_{t}\right)^{\circ 2}\right) \odot \left(\left[T_{0} \geq t + 2\right] "
                         r"\left(U^{(1)\top} \delta^{(1)}_{t + 1}\right) + \left[t = T_{0} - 1\right] "
                         r"\left(W^{(2)\top} \delta^{(2)}\right)\right)")
    dU = forms[r"\frac{\partial C}{\partial U^{(1)}}"]
    assert dU.rhs == r"\sum_{t=1}^{T_{0} - 1} {\Delta^{(1)}_{t}}^{\top} H^{(1)}_{t - 1}" and dU.shape == r"n_{1} \times n_{1}"
    md = doc.to_markdown()
    assert "For each example and step $t$ (column vectors), shape $n_{1}$:" in md
    grads = derive(model)
    tensors = {**model.tensors, **{a.name: a for a in grads.adjoints.values()}}
    rng = np.random.default_rng(9)
    compared = 0
    for form in (step, delta, dU):
        for sizes in check_sizes(form.eq, tensors, count=4)[2:]:
            env = random_env(form.eq, tensors, sizes, rng)
            T_value = sizes[model.tensors["x"].shape[1]]
            for t_value in range(T_value if form.fixed else 1):
                fixed = {i: (t_value if str(i) == "t" else 1) for i in form.fixed}
                got, want = form.evaluate(env, sizes, fixed), form.reference(env, sizes, fixed)
                np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
                compared += want.size
    assert compared > 100


@functools.lru_cache(maxsize=1)
def _lstm_and_gru_sources():
    from chainrule.codegen.render import render_module
    from chainrule.derive import build_model
    out = {}
    for cell in ("lstm", "gru"):
        src = render_module(build_model(f"seq(5, 3) -> {cell}(4) -> dense(2) -> softmax_cross_entropy"), "float64")
        out[cell] = src[src.index("def loss_and_grads"):src.index("def train_step")]
    return out


def test_gate_adjoints_and_forward_values_are_computed_once():
    """The LSTM's gate products (1 - f) f d_f are computed once per backward step, as sequences
    the next step's _matmul and the weight and bias gradients read (codegen/step_operands.py);
    tanh(c) is computed once, by the forward step (codegen/forward_values.py); the GRU's
    U_n h(t-1) is kept by the forward step, so the backward step has no product with h; and no
    time step copies a slice of the sequence at its own time."""
    srcs = _lstm_and_gru_sources()
    lstm = srcs["lstm"]
    code = [ln.strip() for ln in lstm.splitlines() if not ln.strip().startswith("#")]
    (_, forward), (_, backward) = _time_loops(lstm)
    # each gate's product, in the code (not the comments): once, inside the backward loop
    for gate in ("t6_i1", "t10_f1", "t18_o1"):
        product = [ln for ln in code if f"(1 - {gate}[" in ln]
        assert len(product) == 1 and product[0].startswith("step_operand"), product
        assert any(product[0] in ln for ln in backward)
    assert len([ln for ln in code if "(1 - t14_g1[" in ln and "**2" in ln]) == 1
    # the next step's contractions and the gradients read the kept sequences
    assert sum("_matmul(step_operand" in ln and "_sp1, " in ln for ln in backward) == 4
    assert sum(ln.startswith("gemm") and "_matmul(step_operand" in ln for ln in code) == 8   # d_U, d_W
    # tanh: twice per forward step (g and tanh(c), kept), never in the backward step
    assert sum("_tanh(" in ln for ln in code) == 2 and sum("_tanh(" in ln for ln in forward) == 2
    assert any(ln.strip().startswith("kept") and "= _tanh(t2_c1_now[i0, i1])" in ln for ln in forward)
    # no copy of a slice at the step's own time; the state at t-1 carried, not copied
    assert not any("ascontiguousarray" in ln for ln in forward)
    assert "t1_h1_sm1 = t1_h1_now  # h1 at this step, read by the next one" in "\n".join(forward)
    gru = srcs["gru"]
    (_, g_forward), (_, g_backward) = _time_loops(gru)
    assert "kept1_now = _matmul(t1_h1_sm1, t11_Un1_T)" in "\n".join(g_forward)
    assert not any("_matmul(t1_h1_sm1" in ln for ln in g_backward)
    assert any(re.search(r"\(t13_bhn1\[i1\] \+ kept1\[i0, t\d+, i1\]\)", ln) for ln in g_backward)


def test_a_backward_loop_stores_only_the_sequences_read_after_it():
    """Of the LSTM's backward results, only the gate products (read by the weight and bias gradients
    after the loop) are stored as sequences; d_c is handed from step to step in its own array;
    d_h, d_o, d_g, d_f and d_i, read only within their step, are scalars of the step's loop (no
    array, no store). The values are checked against NumPy and PyTorch in test_sequence_layers."""
    lstm = _lstm_and_gru_sources()["lstm"]
    (_, forward), (before_bwd, backward) = _time_loops(lstm)
    stores = [ln.strip() for ln in backward if "# store " in ln]
    assert [s.split("[")[0] for s in stores] == [f"step_operand{k}" for k in sorted(
        int(s.split("[")[0][len("step_operand"):]) for s in stores)] and len(stores) == 4
    assert "# not stored (nothing after the loop reads them): d_h1; d_c1; d_o1; d_g1; d_f1; d_i1" in \
        "\n".join(before_bwd)
    assert not any(re.match(r"\s+t\d+_d_\w+ = (np.empty|u_ws)", ln) for ln in before_bwd[-30:])
    for local in ("d_h1", "d_o1", "d_g1", "d_f1", "d_i1"):
        assert any(re.match(rf"\s+t\d+_{local}_now = ", ln) for ln in backward), local
        assert not any(re.search(rf"t\d+_{local}_now(\[| = np.empty)", ln) for ln in backward), local
    assert "t29_d_c1_sp1 = t29_d_c1_now  # d_c1 at this step, read by the next one" in "\n".join(backward)
    # f at t+1 and c at t-1, read elementwise, are indexed in place (the index clamped into the
    # sequence, zeros selected outside it), not copied into slices at every step
    assert not any("ascontiguousarray" in ln for ln in backward)
    code = "\n".join(backward)
    assert re.search(r"\(\(t10_f1\[i0, min\(4, (t\d+) \+ 1\), i1\]\) if \(\(\1 <= 3\)\) else 0\)", code)
    assert re.search(r"\(\(t2_c1\[i0, max\(0, (t\d+) - 1\), i1\]\) if \(\(\1 >= 1\)\) else 0\)", code)


def test_a_step_writes_its_results_into_their_sequences():
    """The LSTM's forward step writes the gates and tanh(c) straight into their sequences (the
    backward pass reads them all), and the later statements of the step read them there; only c
    and h, handed to the next step in arrays of their own (h is the next product's operand), are
    copied into their sequences after the loop nest."""
    lstm = _lstm_and_gru_sources()["lstm"]
    (_, forward), _ = _time_loops(lstm)
    code = "\n".join(forward)
    for seq, value in (("t6_i1", "sigmoid(dot"), ("t10_f1", "sigmoid(dot"), ("t14_g1", "_tanh(dot"),
                       ("t18_o1", "sigmoid(dot"), ("kept1", "_tanh(t2_c1_now[i0, i1])")):
        assert re.search(rf"\n\s+{seq}\[i0, t\d+, i1\] = {re.escape(value)}", code), seq
        assert f"{seq}_now" not in code
    assert re.search(r"t1_h1_now\[i0, i1\] = kept1\[i0, t\d+, i1\]\*t18_o1\[i0, t\d+, i1\]", code)
    assert [ln.strip().split(" = ")[0] for ln in forward if "# store " in ln] == ["t2_c1[:, t2, :]", "t1_h1[:, t2, :]"]


def test_input_gradients_through_a_backward_loop_that_stores_little(kernel_cache_dir):
    """input_grads keeps what it returns: the LSTM's dC/dx, computed after the backward loop from
    the gate products it stores, against central differences in float64 (batch 7, 5 steps, 3
    features, 4 units; all 105 entries compared), while d_h, d_c and the gate adjoints are not
    stored there either."""
    from chainrule.codegen import compile_model
    cm = compile_model("seq(5, 3) -> lstm(4) -> dense(3) -> softmax_cross_entropy", dtype="float64",
                       input_grads=True, cache_dir=kernel_cache_dir)
    part = cm.source[cm.source.index("def input_grads"):]
    assert "# not stored (nothing after the loop reads them): d_h1; d_c1; d_o1; d_g1; d_f1; d_i1" in part
    rng = np.random.default_rng(1)
    params = cm.init_params(seed=3)
    x, y = rng.normal(size=(7, 5, 3)), np.eye(3)[rng.integers(0, 3, 7)]
    _, grads = cm.input_grads(params, x, y)
    numeric, eps = np.zeros_like(x), 1e-6
    for idx in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += eps
        down[idx] -= eps
        numeric[idx] = (cm.input_grads(params, up, y)[0] - cm.input_grads(params, down, y)[0]) / (2 * eps)
    assert np.abs(numeric).max() > 1e-3
    np.testing.assert_allclose(grads["x"], numeric, rtol=1e-6, atol=1e-9)
