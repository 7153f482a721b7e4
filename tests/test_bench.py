"""The benchmark's baseline is the reference code's formulation; where q8 means the same thing
(a float32 weight-gradient copy) the optimized layer must give the same numbers."""

import torch
import torch.nn.functional as F

import q8
from scripts import bench


def test_q8_matches_the_reference_formulation_with_a_float_weight_gradient_copy():
    torch.manual_seed(0)
    ref = bench.RefConv2d(4, 6, 3, padding=1)
    mine = q8.QConv2d.from_float(torch.nn.Conv2d(4, 6, 3, padding=1), q8.LayerQuant(grad_weight_bits=None))
    mine.load_state_dict(ref.state_dict(), strict=False)
    x1 = torch.randn(8, 4, 7, 7, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    g = torch.randn(8, 6, 7, 7)
    torch.manual_seed(1)
    out_ref = ref(x1)
    out_ref.backward(g)
    torch.manual_seed(1)  # both draw the 8-bit copy's noise from the same stream
    out = mine(x2)
    out.backward(g)
    assert torch.allclose(out, out_ref, atol=1e-5)
    assert torch.allclose(x2.grad, x1.grad, atol=1e-5)
    assert torch.allclose(mine.weight.grad, ref.weight.grad, atol=1e-4)
    assert torch.allclose(mine.bias.grad, ref.bias.grad, atol=1e-4)


def test_benchmark_runs_and_prints_the_ratio_line(capsys, tmp_path):
    bench.MODELS["tiny"] = ("resnet20", 32, 4, 4)
    try:
        bench.main(["--models", "tiny", "--steps", "1", "--warmup", "0", "--no-memory", "--out", str(tmp_path / "b.md")])
    finally:
        del bench.MODELS["tiny"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("int8/fp32=") and "int8/reference=" in last and "mem_int8/fp32=n/a" in last
    assert "| tiny 32x32 |" in (tmp_path / "b.md").read_text()
