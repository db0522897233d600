"""The sequence layers against independent references: PyTorch's nn.LSTM / nn.GRU (where installed),
NumPy by hand, and finite differences; their errors, as the user sees them."""
import numpy as np
import pytest

from chainrule.derive import build_model
from chainrule.derive.errors import ShapeError, SpecError

GRU_SPEC = "seq(5, 3) -> gru(4) -> dense(2) -> mse"
LSTM_SPEC = "seq(5, 3) -> lstm(4) -> dense(2) -> mse"


def _sigmoid(u):
    return 1 / (1 + np.exp(-u))


def numpy_gru(p, x):
    """PyTorch's GRU equations, by hand."""
    h = np.zeros((x.shape[0], p["Ur1"].shape[0]))
    for t in range(x.shape[1]):
        xt = x[:, t]
        r = _sigmoid(xt @ p["Wr1"].T + h @ p["Ur1"].T + p["br1"])
        z = _sigmoid(xt @ p["Wz1"].T + h @ p["Uz1"].T + p["bz1"])
        n = np.tanh(xt @ p["Wn1"].T + p["bn1"] + r * (h @ p["Un1"].T + p["bhn1"]))
        h = (1 - z) * n + z * h
    return h @ p["W2"].T + p["b2"]


def numpy_lstm(p, x):
    h = np.zeros((x.shape[0], p["Ui1"].shape[0]))
    c = np.zeros_like(h)
    for t in range(x.shape[1]):
        xt = x[:, t]
        gate = {g: xt @ p[f"W{g}1"].T + h @ p[f"U{g}1"].T + p[f"b{g}1"] for g in "ifgo"}
        c = _sigmoid(gate["f"]) * c + _sigmoid(gate["i"]) * np.tanh(gate["g"])
        h = _sigmoid(gate["o"]) * np.tanh(c)
    return h @ p["W2"].T + p["b2"]


def _params(cm, seed=1):
    rng = np.random.default_rng(seed)
    params = cm.init_params(seed)
    for k in params:                      # nonzero biases: every term of the equations matters
        params[k] = params[k] + 0.3 * rng.normal(size=params[k].shape)
    return params


def _torch_reference(kind, p, x, y):
    """(prediction, gradients by name) from PyTorch autograd, with chainrule's parameters loaded."""
    torch = pytest.importorskip("torch")
    torch.set_default_dtype(torch.float64)
    m = p["W2"].shape[1]
    cell = (torch.nn.GRU if kind == "gru" else torch.nn.LSTM)(3, m, batch_first=True)
    gates = "rzn" if kind == "gru" else "ifgo"
    with torch.no_grad():
        cell.weight_ih_l0.copy_(torch.tensor(np.concatenate([p[f"W{g}1"] for g in gates])))
        cell.weight_hh_l0.copy_(torch.tensor(np.concatenate([p[f"U{g}1"] for g in gates])))
        cell.bias_ih_l0.copy_(torch.tensor(np.concatenate([p[f"b{g}1"] for g in gates])))
        hh = [np.zeros(m) for _ in gates]
        if kind == "gru":
            hh[2] = p["bhn1"]                 # the reset gate scales the candidate's recurrent bias
        cell.bias_hh_l0.copy_(torch.tensor(np.concatenate(hh)))
    W2 = torch.tensor(p["W2"], requires_grad=True)
    b2 = torch.tensor(p["b2"], requires_grad=True)
    out, _ = cell(torch.tensor(x))
    pred = out[:, -1] @ W2.T + b2
    cost = ((pred - torch.tensor(y)) ** 2).mean(dim=1).mean()
    cost.backward()
    grads = {"W2": W2.grad.numpy(), "b2": b2.grad.numpy()}
    for name, blocks in (("weight_ih_l0", "W"), ("weight_hh_l0", "U"), ("bias_ih_l0", "b")):
        for g, block in zip(gates, np.split(getattr(cell, name).grad.numpy(), len(gates))):
            grads[f"{blocks}{g}1"] = block
    if kind == "gru":
        grads["bhn1"] = np.split(cell.bias_hh_l0.grad.numpy(), 3)[2]
    return pred.detach().numpy(), grads


@pytest.mark.parametrize("kind", ["gru", pytest.param("lstm", marks=pytest.mark.slow)])
def test_gated_layers_match_numpy_and_pytorch(compiled_model, kind):
    """The declared GRU and LSTM: predictions against NumPy by hand, gradients against PyTorch autograd."""
    cm = compiled_model(GRU_SPEC if kind == "gru" else LSTM_SPEC)
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(6, 5, 3)), rng.normal(size=(6, 2))
    p = _params(cm)
    pred = cm.predict(p, x)
    reference = numpy_gru if kind == "gru" else numpy_lstm
    assert np.allclose(pred, reference(p, x), rtol=1e-12, atol=1e-12)
    cost, grads = cm.loss_and_grads(p, x, y)
    torch_pred, torch_grads = _torch_reference(kind, p, x, y)
    assert np.allclose(pred, torch_pred, rtol=1e-10, atol=1e-12)
    assert set(torch_grads) == set(grads)
    for name, g in torch_grads.items():
        assert np.allclose(grads[name], g, rtol=1e-9, atol=1e-12), name


def test_the_rnn_spec_stacks_and_reaches_finite_differences(compiled_model):
    from chainrule.codegen.verify import check_gradients
    from chainrule.codegen.facts import FactError
    cm = compiled_model("tokens(5, 7) -> embedding(3) -> rnn(4, return_sequences=1) -> rnn(4) -> dense(2) -> mse")
    for check in check_gradients(None, compiled=cm, batch=4):
        assert check.ok, str(check)
    params = cm.init_params(0)
    ids = np.array([[0, 1, 2, 3, 4], [6, 5, 7, 1, 0]])
    # a token id outside the vocabulary never reaches the kernels (it would read outside the table)
    with pytest.raises(FactError, match=r"input x \(2, 5\) holds token id 7 at \[1, 2\], outside the "
                                        r"vocabulary \[0, 7\) of layer 1:embedding\(3\), whose table E1 \(7, 3\) has one "
                                        r"row per token; 1 entry is outside"):
        cm.predict(params, ids)
    # a sequence of the wrong rank: named with the shape expected
    with pytest.raises(ShapeError, match=r"input x has shape \(2, 5, 1\), expected \(B, 5\) \(read by layer "
                                         r"1:embedding\(3\)\)"):
        cm.predict(params, ids[:, :, None])
    # a longer sequence: the size the model was declared with (no parameter has it: an RNN's weights
    # are the same at every length, but its kernels were generated for T_0 = 5)
    with pytest.raises(ShapeError, match=r"^input x has shape \(2, 6\), expected \(B, 5\) \(read by layer "
                                         r"1:embedding\(3\)\); axis 1 is the size T_0 = 5 the model was "
                                         r"declared with: declare the model with T_0 = 6$"):
        cm.predict(params, np.zeros((2, 6)))
    assert cm.predict(params, np.clip(ids, 0, 6)).shape == (2, 2)


def test_a_recurrent_layer_on_a_flat_input_is_refused():
    with pytest.raises(ShapeError, match=r"layer 1:gru\(4\) \(gru\) expects a \(batch, time, features\) sequence, "
                                         r"got x \(B, n_0\): give the input as seq\(T, N\)"):
        build_model("3 -> gru(4) -> dense(2) -> mse")


def test_an_embedding_needs_token_ids():
    with pytest.raises(ShapeError, match=r"layer 1:embedding\(4\) \(embedding\) expects \(batch, time\) token ids, "
                                         r"got x \(B, T_0, n_0\): give the input as tokens\(T, V\)"):
        build_model("seq(5, 3) -> embedding(4) -> rnn(4) -> dense(2) -> mse")


def test_a_flattened_sequence_feeds_one_dense_layer_over_every_position():
    """flatten, then dense: one affine map of all T x n values (not the per-position dense a sequence
    gets without flatten), exactly verified."""
    from chainrule.derive.verify import verify_model
    model = build_model("seq(5, 3) -> flatten -> dense(4) -> mse")
    z = model.tensors["z1"]
    assert z.rank == 2 and model.tensors["W1"].rank == 3          # W1[o, t, i]: every position's weights
    results = verify_model(model)
    assert all(results) and all(r.checked > 0 for r in results)


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_a_learned_initial_state_from_the_spec_verifies_exactly(cell):
    """``learn_initial=1``: the state before t = 0 is a parameter (the LSTM's cell state too), and its
    gradient (what the first step sends back, summed over the batch) is exact at two sizes, T included."""
    from chainrule.derive.verify import verify_model
    model = build_model(f"seq(3, 2) -> {cell}(3, learn_initial=1) -> dense(2) -> mse")
    initial = {"rnn": {"h01"}, "lstm": {"h01", "c01"}}[cell]
    assert initial <= {p.name for p in model.params}
    checks = verify_model(model, points=1)
    assert initial <= {c.name.split("dC/d")[1] for c in checks}
    for c in checks:
        assert c and c.checked > 0, str(c)
        assert len({s["T_0"] for s in c.sizes}) == 2, c.sizes


def test_a_recurrent_layer_with_an_unknown_option_names_its_usage():
    with pytest.raises(SpecError, match=r"item 2: lstm: bad arguments; usage: lstm\(N, return_sequences=0\|1, "
                                        r"learn_initial=0\|1\)"):
        build_model("seq(4, 3) -> lstm(5, initial=1) -> dense(2) -> mse")
