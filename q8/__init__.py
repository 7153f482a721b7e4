"""q8: 8-bit training of neural networks (Banner et al., NeurIPS 2018) in PyTorch."""

from .config import PRESETS, LayerQuant, QuantConfig
from .convert import Coverage, convert, coverage, float_state_dict, unconvert
from .diagnostics import cosine, cosine_bound, layer_fidelity, sqnr_db
from .layers import (QBatchNorm1d, QBatchNorm2d, QBatchNorm3d, QConv1d, QConv2d, QConv3d, QConvTranspose1d,
                     QConvTranspose2d, QConvTranspose3d, QGroupNorm, QLayerNorm, QLinear, QMultiheadAttention,
                     RangeBatchNorm1d, RangeBatchNorm2d, RangeBatchNorm3d,
                     expected_range)
from .recurrent import QGRU, QLSTM, QRNN
from .quantize import (Codes, SampleRotation, channel_range, encode, quantize, quantize_grad, quantize_gradient,
                       rounding_state, sample_mean_range, seed_rounding, set_rounding_state, tensor_range)

__all__ = [
    "PRESETS", "LayerQuant", "QuantConfig", "Coverage", "convert", "coverage", "float_state_dict", "unconvert", "cosine", "cosine_bound", "layer_fidelity", "sqnr_db",
    "QBatchNorm1d", "QBatchNorm2d", "QBatchNorm3d", "QConv1d", "QConv2d", "QConv3d", "QConvTranspose1d",
    "QConvTranspose2d", "QConvTranspose3d", "QGroupNorm", "QLayerNorm", "QLinear", "QMultiheadAttention",
    "RangeBatchNorm1d", "RangeBatchNorm2d", "RangeBatchNorm3d", "expected_range", "QGRU", "QLSTM", "QRNN",
    "Codes", "SampleRotation", "channel_range", "encode", "quantize", "quantize_grad", "quantize_gradient",
    "rounding_state", "sample_mean_range",
    "seed_rounding", "set_rounding_state", "tensor_range",
]
