"""QRNN, QLSTM, QGRU: torch's recurrent arithmetic exactly where nothing is rounded, every product
quantized as written out where it is, per-step hidden-state ranges, and convert / unconvert."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import q8
from q8 import LayerQuant, QuantConfig
from q8.layers import ActivationRange
from q8.quantize import quantize_tensor, sample_mean_range
from q8.recurrent import QGRU, QLSTM, QRNN

PAPER = LayerQuant()
# nothing rounded in forward or in the back-propagated gradient; only the weight-gradient copy is
# 16-bit, so the layer takes its unrolled, quantized path (not torch's)
UNROUNDED = LayerQuant(weight_bits=None, act_bits=None, grad_bits=None, grad_weight_bits=16)
Q_OF = {nn.RNN: QRNN, nn.LSTM: QLSTM, nn.GRU: QGRU}
F_IN, HIDDEN, T, N = 5, 6, 7, 4


def pair(kind, spec, **kwargs):
    """A torch recurrent layer and its quantized twin holding copies of the same Parameters."""
    torch.manual_seed(0)
    ref = kind(F_IN, HIDDEN, **kwargs)
    twin = kind(F_IN, HIDDEN, **kwargs)
    twin.load_state_dict(ref.state_dict())
    return ref, Q_OF[kind].from_float(twin, spec)


def initial_state(kind, case, batched=True):
    """Random (h0, c0) or h0 with requires_grad, shaped for the layer of `case`."""
    kw = case.get("module", {})
    pairs = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    shape = (pairs, N) if batched else (pairs,)
    torch.manual_seed(3)
    h0 = torch.randn(*shape, kw.get("proj_size") or HIDDEN, requires_grad=True)
    if kind is nn.LSTM:
        return h0, torch.randn(*shape, HIDDEN, requires_grad=True)
    return h0


def leaves(state):
    return list(state) if isinstance(state, tuple) else [state]


CASES = [
    dict(kind=nn.LSTM, module=dict(num_layers=2, bidirectional=True)),
    dict(kind=nn.LSTM, module=dict(num_layers=2, proj_size=3, batch_first=True), hx=True),
    dict(kind=nn.LSTM, module=dict(bias=False), batched=False, hx=True),
    dict(kind=nn.GRU, module=dict(num_layers=2, batch_first=True), hx=True),
    dict(kind=nn.GRU, module=dict(bidirectional=True), batched=False),
    dict(kind=nn.RNN, module=dict(nonlinearity="relu", num_layers=2)),
    dict(kind=nn.RNN, module=dict(bidirectional=True, batch_first=True), hx=True),
    dict(kind=nn.LSTM, module=dict(num_layers=2, bidirectional=True, batch_first=True), packed=True, hx=True),
    dict(kind=nn.GRU, module=dict(bidirectional=True), packed=True),
]


def case_id(case):
    extra = "-".join(f"{k}={v}" for k, v in case.items() if k not in ("kind", "module"))
    return f"{case['kind'].__name__}-" + "-".join(f"{k}={v}" for k, v in case["module"].items()) + ("-" + extra if extra else "")


def run(layer, case, x, hx):
    """(output as a padded tensor, final states) for plain or packed input."""
    if not case.get("packed"):
        return layer(x, hx)
    lengths = torch.tensor([T, 3, 5, 1])  # unsorted: the packed order differs from the batch's
    first = case["module"].get("batch_first", False)
    out, state = layer(pack_padded_sequence(x, lengths, batch_first=first, enforce_sorted=False), hx)
    return pad_packed_sequence(out, batch_first=first, total_length=T)[0], state


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_torch_where_nothing_is_rounded(case):
    """Outputs, final states, and the gradients of the input and the initial states equal torch's;
    the weight gradients (from the 16-bit copy) are within 16-bit rounding of torch's."""
    kind, batched = case["kind"], case.get("batched", True)
    ref, q = pair(kind, UNROUNDED, **case["module"])
    torch.manual_seed(1)
    shape = ((N, T) if case["module"].get("batch_first") else (T, N)) if batched else (T,)
    x = torch.randn(*shape, F_IN, requires_grad=True)
    hx = initial_state(kind, case, batched) if case.get("hx") else None
    y_ref, s_ref = run(ref, case, x, hx)
    y_q, s_q = run(q, case, x, hx)
    torch.testing.assert_close(y_q, y_ref, atol=1e-6, rtol=1e-5)
    for a, b in zip(leaves(s_q), leaves(s_ref)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.manual_seed(2)
    outs_ref, outs_q = [y_ref] + leaves(s_ref), [y_q] + leaves(s_q)
    seeds = [torch.randn_like(t) for t in outs_ref]
    inputs = [x] + ([] if hx is None else leaves(hx))
    params = list(ref.parameters())
    g_ref = torch.autograd.grad(outs_ref, inputs + params, seeds)
    g_q = torch.autograd.grad(outs_q, inputs + list(q.parameters()), seeds)
    for a, b in zip(g_q[:len(inputs)], g_ref[:len(inputs)]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for (name, _), a, b in zip(ref.named_parameters(), g_q[len(inputs):], g_ref[len(inputs):]):
        # each step's 16-bit copy errs by at most half a step of that step's range, 2^-16 of it
        err = float((a - b).abs().max() / b.abs().max())
        assert err < 2e-4, (name, err)


def test_paper_spec_output_is_the_written_out_formula():
    """A 1-layer tanh RNN over two steps at 8 bits: the input over its sample-mean range (all steps
    at once), each step's hidden state over its own, the weights over theirs."""
    torch.manual_seed(0)
    q = QRNN.from_float(nn.RNN(F_IN, HIDDEN, batch_first=True), PAPER).train()
    x = torch.randn(N, 2, F_IN)
    h0 = torch.randn(1, N, HIDDEN)
    out, _ = q(x, h0)

    def act(v):
        lo, hi = sample_mean_range(v)
        return q8.quantize(v, 8, lo=lo, hi=hi)

    w_ih, w_hh = quantize_tensor(q.weight_ih_l0, 8, "nearest"), quantize_tensor(q.weight_hh_l0, 8, "nearest")
    gx = act(x) @ w_ih.t() + q.bias_ih_l0
    h = h0[0]
    for t in range(2):
        h = torch.tanh(gx[:, t] + act(h) @ w_hh.t() + q.bias_hh_l0)
        torch.testing.assert_close(out[:, t], h, atol=1e-6, rtol=1e-5)
    assert not torch.equal(out, nn.RNN.forward(q, x, h0)[0])  # the quantization mattered


def test_gradient_bifurcation_at_each_step():
    """With nearest rounding (deterministic), one step of an RNN: the gradient reaching h0 and x
    goes through the 8-bit copy of the pre-activation gradient, the weight gradients through the
    16-bit copy."""
    spec = LayerQuant(weight_bits=None, act_bits=None, grad_bits=8, grad_weight_bits=16, grad_rounding="nearest")
    torch.manual_seed(0)
    q = QRNN.from_float(nn.RNN(F_IN, HIDDEN, batch_first=True), spec)
    x = torch.randn(N, 1, F_IN, requires_grad=True)
    h0 = torch.randn(1, N, HIDDEN, requires_grad=True)
    out, _ = q(x, h0)
    g = torch.randn_like(out)
    out.backward(g)
    g_pre = (g * (1 - out.detach() ** 2))[:, 0]  # the gradient of the pre-activation
    g8, g16 = quantize_tensor(g_pre, 8, "nearest"), quantize_tensor(g_pre, 16, "nearest")
    torch.testing.assert_close(h0.grad[0], g8 @ q.weight_hh_l0.detach())
    torch.testing.assert_close(x.grad[:, 0], g8 @ q.weight_ih_l0.detach())
    torch.testing.assert_close(q.weight_hh_l0.grad, g16.t() @ h0.detach()[0])
    torch.testing.assert_close(q.weight_ih_l0.grad, g16.t() @ x.detach()[:, 0])
    torch.testing.assert_close(q.bias_hh_l0.grad, g16.sum(0))
    assert not torch.allclose(h0.grad[0], g_pre @ q.weight_hh_l0.detach(), atol=1e-7, rtol=0)


def test_hidden_state_ranges_track_every_step_and_evaluation_uses_them(monkeypatch):
    """Training folds the widest of the steps' ranges into each hidden_ranges entry once per
    forward (the first step's zero state adds nothing), and the second layer's input range is its
    own; evaluation quantizes with those running ranges."""
    torch.manual_seed(0)
    q = QLSTM.from_float(nn.LSTM(F_IN, HIDDEN, num_layers=2, bidirectional=True), PAPER).train()
    x = torch.randn(T, N, F_IN)
    seen = []
    original = ActivationRange.batch_range_of

    def spy(self, v):
        r = original(self, v)
        if self is q.hidden_ranges[0]:
            seen.append(r)
        return r

    monkeypatch.setattr(ActivationRange, "batch_range_of", spy)
    q(x)
    monkeypatch.undo()
    assert len(seen) == T  # one range per step
    lo, hi = q.hidden_ranges[0].act_range
    assert float(lo) == min(float(s[0]) for s in seen) and float(hi) == max(float(s[1]) for s in seen)
    assert seen[0][0] == seen[0][1] == 0  # the zero initial state
    assert -1 <= float(lo) < 0 < float(hi) <= 1  # an LSTM's hidden state lies in (-1, 1)
    assert len(q.input_ranges) == 1 and not torch.isnan(q.input_ranges[0].act_range).any()
    assert not torch.isnan(q.act_range).any()
    q.eval()
    with torch.no_grad():
        before = q(x)[0]
        q.hidden_ranges[1].act_range.mul_(0.5)  # the reverse direction of layer 0: a narrower range clips
        after = q(x)[0]
    assert not torch.equal(before, after)


def test_convert_unconvert_and_state_dict():
    """convert swaps nn.LSTM / GRU / RNN (reusing their Parameters), coverage counts them quantized,
    unconvert gives back torch layers that run torch's own forward, and a converted model's
    ranges survive re-conversion."""
    torch.manual_seed(0)
    model = nn.ModuleDict(dict(lstm=nn.LSTM(F_IN, HIDDEN, proj_size=3), gru=nn.GRU(F_IN, HIDDEN, num_layers=2),
                               rnn=nn.RNN(F_IN, HIDDEN, nonlinearity="relu")))
    x = torch.randn(T, N, F_IN)
    float_out = {k: m(x)[0] for k, m in model.items()}
    weights = {k: m.weight_ih_l0 for k, m in model.items()}
    q8.convert(model, QuantConfig(), strict=True)
    assert {k: type(m) for k, m in model.items()} == dict(lstm=QLSTM, gru=QGRU, rnn=QRNN)
    assert all(m.weight_ih_l0 is weights[k] for k, m in model.items())
    report = q8.coverage(model, example=None)
    assert report.share() == 1.0 and dict(report.quantized) == {"LSTM": 1, "GRU": 1, "RNN": 1}
    keys = set(model.state_dict())
    assert {"lstm.act_range", "lstm.hidden_ranges.0.act_range", "lstm.proj_ranges.0.act_range",
            "gru.input_ranges.0.act_range", "gru.hidden_ranges.1.act_range"} <= keys
    model.train()
    for m in model.values():
        m(x)
    trained = model.gru.hidden_ranges[1].act_range.clone()
    q8.convert(model, QuantConfig.preset("int8_fp32_wgrad"))
    torch.testing.assert_close(model.gru.hidden_ranges[1].act_range, trained)
    assert model.gru.hidden_ranges[1].spec.grad_weight_bits is None
    q8.unconvert(model)
    assert {k: type(m) for k, m in model.items()} == dict(lstm=nn.LSTM, gru=nn.GRU, rnn=nn.RNN)
    assert all(m.weight_ih_l0 is weights[k] for k, m in model.items())
    for k, m in model.items():
        torch.testing.assert_close(m(x)[0], float_out[k])
    assert not any(k.endswith("act_range") for k in model.state_dict())


@pytest.mark.parametrize("kind", [nn.GRU, nn.LSTM, nn.RNN])
def test_autocast_and_dtypes(kind):
    """Under autocast the products run in its dtype and the recurrence in the input's (as torch's
    CPU GRU: float32 out); every gradient comes back in its tensor's dtype, and the output is close
    to torch's float layer."""
    ref, q = pair(kind, PAPER, batch_first=True)
    x = torch.randn(N, T, F_IN, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = q(x)
    y.sum().backward()
    assert y.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in q.parameters())
    assert q8.cosine(y.float(), ref(x)[0]) > 0.99


def test_paper_preset_is_close_to_float_and_trains():
    """At the paper's preset an LSTM's output keeps direction (cosine > 0.99 to float) and it
    learns a toy task that needs memory: the sign of a feature's sum over the sequence (float: loss
    0.69 -> 0.005 in 40 Adam steps; measured 0.003 here)."""
    ref, q = pair(nn.LSTM, PAPER, num_layers=2, batch_first=True)
    torch.manual_seed(4)
    x = torch.randn(32, T, F_IN)
    assert q8.cosine(q(x)[0], ref(x)[0]) > 0.99
    target = x.sum(1)[:, :1].sign()
    head = nn.Linear(HIDDEN, 1)
    opt = torch.optim.Adam(list(q.parameters()) + list(head.parameters()), lr=0.03)
    losses = []
    for _ in range(40):
        loss = nn.functional.soft_margin_loss(head(q(x)[0][:, -1]), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]


def test_shape_errors_are_torch_s():
    _, q = pair(nn.LSTM, PAPER)
    with pytest.raises(RuntimeError, match="Expected hidden"):
        q(torch.randn(T, N, F_IN), (torch.zeros(1, N + 1, HIDDEN), torch.zeros(1, N + 1, HIDDEN)))
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        q(torch.randn(T, N, F_IN + 1))
