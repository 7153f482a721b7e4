"""QMultiheadAttention and transformers: torch's attention arithmetic exactly where nothing is
rounded, each projection quantized as its own layer, and no fused float path in evaluation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import q8
from q8 import LayerQuant, QMultiheadAttention, QuantConfig
from q8.layers import LinearOps, PackedLinearOps, _quantize_weight
from q8.quantize import quantize_tensor

PAPER = LayerQuant()
# nothing rounded in forward or in the back-propagated gradient; only the weight-gradient copy is
# 16-bit, so the layer takes its quantized path (not torch's)
UNROUNDED = LayerQuant(weight_bits=None, act_bits=None, grad_bits=None, grad_weight_bits=16)

E, HEADS, L, S, N = 8, 2, 5, 7, 3


def pair(spec, **kwargs):
    """A torch MultiheadAttention and its quantized twin holding copies of the same Parameters."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, HEADS, **kwargs)
    with torch.no_grad():
        for p in ref.parameters():  # nonzero biases, bias_k / bias_v too
            p.add_(0.1 * torch.randn_like(p))
    twin = nn.MultiheadAttention(E, HEADS, **kwargs)
    twin.load_state_dict(ref.state_dict())
    return ref, QMultiheadAttention.from_float(twin, spec)


def inputs(kind, batch_first, batched=True, kdim=E, vdim=E):
    torch.manual_seed(1)
    shape = (lambda n, d: (N, n, d) if batch_first else (n, N, d)) if batched else (lambda n, d: (n, d))
    q = torch.randn(shape(L, E), requires_grad=True)
    if kind == "self":
        return q, q, q
    k = torch.randn(shape(S, kdim), requires_grad=True)
    return q, k, (k if kind == "key_is_value" else torch.randn(shape(S, vdim), requires_grad=True))


CASES = [
    dict(kind="self", batch_first=True),
    dict(kind="self", batch_first=False, need_weights=False),
    dict(kind="key_is_value", batch_first=True, average_attn_weights=False),
    dict(kind="separate", batch_first=False, module=dict(kdim=5, vdim=6)),
    dict(kind="separate", batch_first=True, module=dict(bias=False)),
    dict(kind="key_is_value", batch_first=True, module=dict(add_bias_kv=True, add_zero_attn=True), masks=True),
    dict(kind="self", batch_first=True, batched=False, masks=True),
    dict(kind="key_is_value", batch_first=False, masks=True, bool_masks=True, need_weights=False),
    dict(kind="separate", batch_first=True, masks=True, mask3d=True),
]


def masks(case):
    """A key padding mask (N, S) and an attention mask (L, S) or (N * heads, L, S), boolean or additive."""
    if not case.get("masks"):
        return {}
    s = L if case["kind"] == "self" else S
    torch.manual_seed(2)
    pad = torch.zeros(N, s, dtype=torch.bool)
    pad[0, -2:] = True
    attn = torch.rand((N * HEADS, L, s) if case.get("mask3d") else (L, s)) < 0.3
    attn[..., 0] = False  # every query sees at least one key
    if not case.get("bool_masks"):
        pad, attn = torch.zeros(pad.shape).masked_fill(pad, -1e9), attn.float() * -2.0
    if not case.get("batched", True):
        pad = pad[0]
    return dict(key_padding_mask=pad, attn_mask=attn)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k != "module"))
def test_matches_torch_attention_where_nothing_is_rounded(case):
    """Outputs, attention weights and input gradients equal torch's MultiheadAttention's; the
    weight gradients (from the 16-bit copy) are within 16-bit rounding of torch's."""
    kwargs = dict(case.get("module", {}), batch_first=case["batch_first"])
    ref, qattn = pair(UNROUNDED, **kwargs)
    call = dict(need_weights=case.get("need_weights", True), average_attn_weights=case.get("average_attn_weights", True),
                **masks(case))
    q, k, v = inputs(case["kind"], case["batch_first"], case.get("batched", True), ref.kdim, ref.vdim)
    out, weights = qattn(q, k, v, **call)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q, k, v] + list(qattn.parameters()), g, allow_unused=True)
    ref_out, ref_weights = ref(q, k, v, **call)
    ref_grads = torch.autograd.grad(ref_out, [q, k, v] + list(ref.parameters()), g, allow_unused=True)
    assert out.shape == ref_out.shape and torch.allclose(out, ref_out, atol=1e-5)
    assert (weights is None) == (ref_weights is None)
    if weights is not None:
        assert weights.shape == ref_weights.shape and torch.allclose(weights, ref_weights, atol=1e-6)
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        if b is None:
            continue
        if i < 3:  # the input gradients: g itself back-propagates
            assert torch.allclose(a, b, atol=1e-5), i
        else:  # the weight gradients: from the 16-bit copy of each product's output gradient
            assert (a - b).norm() <= 1e-3 * b.norm() + 1e-6, i


def test_packed_weight_is_quantized_one_range_per_layer():
    """The query, key and value weights packed in in_proj_weight are three layers: a weight range each."""
    w = torch.randn(3 * E, E) * torch.tensor([1.0, 10.0, 0.1]).repeat_interleave(E)[:, None]
    packed = _quantize_weight(w, PAPER, PackedLinearOps(3))
    assert torch.equal(packed, torch.cat([quantize_tensor(part, 8, "nearest") for part in w.chunk(3)]))
    assert not torch.equal(packed, _quantize_weight(w, PAPER, LinearOps))  # one range would coarsen the small part
    assert (packed[2 * E:] - w[2 * E:]).abs().max() <= 0.5 * (w[2 * E:].max() - w[2 * E:].min()) / 255 + 1e-7


def test_self_attention_in_one_product_equals_three_layers():
    """Self-attention runs one product over the packed weight; a query, key and value that are equal
    tensors but not one run three: the outputs and the weights' gradients agree (one rounding draw)."""
    x = torch.randn(N, L, E)
    results = []
    for query, key, value in ((x, x, x), (x, x.clone(), x.clone())):
        _, qattn = pair(PAPER, batch_first=True)
        torch.manual_seed(3)
        out = qattn(query, key, value, need_weights=False)[0]
        out.sum().backward()
        results.append((out, qattn.in_proj_weight.grad))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    # the gradients differ only by the stochastic rounding of three draws against one
    a, b = results[0][1], results[1][1]
    assert (a - b).norm() <= 0.05 * b.norm()


def test_quantized_attention_rounds_inputs_and_weights_to_8_bits():
    """The output is attention over F.linear of the 8-bit input (its per-sample-mean range) and
    each projection's 8-bit weight, then out_proj (a QLinear) on the attention output."""
    ref, qattn = pair(PAPER, batch_first=True)
    x = torch.randn(N, L, E)
    out, weights = qattn(x, x, x)
    lo, hi = q8.sample_mean_range(x)
    xq = q8.quantize(x, 8, lo=lo, hi=hi)
    wq = torch.cat([quantize_tensor(w, 8, "nearest") for w in qattn.in_proj_weight.detach().chunk(3)])
    q, k, v = F.linear(xq, wq, qattn.in_proj_bias.detach()).chunk(3, -1)
    split = lambda t: t.reshape(N, -1, HEADS, E // HEADS).transpose(1, 2)
    attn = torch.softmax(split(q) @ split(k).transpose(-2, -1) / (E // HEADS) ** 0.5, -1)
    assert torch.allclose(weights, attn.mean(1), atol=1e-6)
    qattn.out_proj.eval()  # its running range is now this batch's: the same quantizer as in the pass
    expected = qattn.out_proj((attn @ split(v)).transpose(1, 2).reshape(N, L, E))
    assert torch.allclose(out, expected, atol=1e-5)
    assert isinstance(qattn.out_proj, q8.QLinear) and not torch.isnan(qattn.act_range).any()
    assert torch.isnan(qattn.key_range.act_range).all()  # no key of its own was seen


@pytest.mark.parametrize("spec,floor", [(PAPER, 0.95), (LayerQuant(act_estimator="batch"), 0.999)],
                         ids=["sample_mean_range", "batch_range"])
def test_output_and_gradients_are_close_to_float(spec, floor):
    """8 bits everywhere: the output and every gradient point where float32's do. The paper's
    per-sample-mean range clips the tails of Gaussian inputs (cosine about 0.97 here); the
    batch's min and max clip nothing, and only rounding is left."""
    ref, qattn = pair(spec, batch_first=True)
    x = torch.randn(16, L, E, requires_grad=True)
    out = qattn(x, x, x, need_weights=False)[0]
    ref_out = ref(x, x, x, need_weights=False)[0]
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x] + list(qattn.parameters()), g)
    ref_grads = torch.autograd.grad(ref_out, [x] + list(ref.parameters()), g)
    assert q8.cosine(out, ref_out) > floor
    for a, b in zip(grads, ref_grads):
        assert torch.isfinite(a).all() and q8.cosine(a, b) > floor


def test_causal_hint_without_a_mask_is_refused_like_torch():
    _, qattn = pair(PAPER, batch_first=True)
    x = torch.randn(N, L, E)
    with pytest.raises(RuntimeError, match="is_causal"):
        qattn(x, x, x, is_causal=True)
    mask = nn.Transformer.generate_square_subsequent_mask(L)
    assert torch.isfinite(qattn(x, x, x, attn_mask=mask, is_causal=True)[0]).all()


def encoder(batch_first=True):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=batch_first)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=batch_first), nn.Flatten(1),
                         nn.Linear(L * E, 4))


def test_transformer_evaluation_takes_the_quantized_path_under_no_grad():
    """torch's TransformerEncoderLayer and TransformerEncoder run fused float kernels in evaluation
    under no_grad, reading their children's weights directly: a converted model turns those off, so
    its evaluation is quantized (as with gradients enabled); unconvert turns them back on."""
    model = q8.convert(encoder(), QuantConfig.preset("int8"))
    x, pad = torch.randn(N, L, E), torch.zeros(N, L, dtype=torch.bool)
    pad[0, -1] = True
    model.train()
    model(x).sum().backward()  # learn every range
    model.eval()
    for mask in (None, pad):
        with torch.no_grad():
            fast = model[0](x, src_key_padding_mask=mask)
        slow = model[0](x, src_key_padding_mask=mask)
        assert torch.equal(fast, slow)
    layer = model[0].layers[0]
    assert isinstance(layer.self_attn, QMultiheadAttention) and layer.activation_relu_or_gelu == 0
    assert not model[0].use_nested_tensor
    q8.unconvert(model)
    assert type(layer.self_attn) is nn.MultiheadAttention and layer.activation_relu_or_gelu == 1
    assert model[0].use_nested_tensor and "_q8_fused" not in vars(layer)
    assert type(layer.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_converted_attention_keeps_names_loads_float_checkpoints_and_converts_back():
    float_model = encoder(batch_first=False)
    state = float_model.state_dict()
    model = q8.convert(encoder(batch_first=False), QuantConfig.preset("int8"))
    model.load_state_dict(state)  # the ranges are learned
    extra = set(model.state_dict()) - set(state)
    assert extra and all(k.endswith("act_range") for k in extra) and set(state) <= set(model.state_dict())
    report = q8.coverage(model)
    assert report.quantized["MultiheadAttention"] == 2 and "NonDynamicallyQuantizableLinear" not in report.unsupported
    assert not report.unsupported and report.quantized["LayerNorm"] == 4  # norm1 and norm2 of each layer
    # converting again to float32: exactly torch's layers
    again = q8.convert(model, QuantConfig.preset("fp32"))
    x = torch.randn(L, N, E)
    float_model.eval(), again.eval()
    assert torch.equal(again[0](x), float_model[0](x))  # (L, N, E): the encoder alone
    assert q8.unconvert(again).state_dict().keys() == state.keys()


def test_vision_transformer_converts_and_trains():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                            num_classes=10)
    q8.convert(vit, QuantConfig.preset("int8"))
    report = q8.coverage(vit)
    assert report.quantized["MultiheadAttention"] == 2 and set(report.unsupported) == {
        "VisionTransformer", "Encoder"}  # the class token and position embedding stay float
    assert report.share() > 0.9
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    loss = F.cross_entropy(vit(x), y)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in vit.parameters() if p.grad is not None)
    rows = q8.layer_fidelity(vit, x, y)
    assert any("out_proj" in r["layer"] for r in rows)
