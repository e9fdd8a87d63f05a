"""Inference-only preparation of a U-Net, done once at load time (model.load does it).

    unet = prepare_for_inference(unet, num_timesteps=1000)
    with torch.inference_mode():
        eps = unet(x, t)        # same call, same state dict, faster

What it does, and why (bench/unet_forward.py measures it):
- eval mode: dropout off.
- channels_last weights on CPU: oneDNN's convolutions run NHWC without reordering the
  activations around every call; each conv then hands channels_last to the next layer, so
  inputs need no conversion. (CUDA is left as is: not measured here.)
- on CPU, every convolution's weight also kept in oneDNN's blocked layout (PackedConv,
  packed at the first call, for its input's size), so that no call reorders it again: the
  largest gain at small batches. Two layers run as cheaper, equivalent convolutions (the
  same function up to float rounding):
  - attention's four projections fold into one 1x1 conv with half their multiply-adds,
    queries and values, with the normed input itself as keys (FoldedAttention);
  - each upsampling conv runs at the input's resolution, one 2x2 kernel per output phase:
    half its multiply-adds, and no upsampled copy (PhaseUpsample).
  These call private oneDNN ops (mkldnn_ops), which a PyTorch release may rename or change.
  So one packed conv is first checked against F.conv2d; if the ops are missing, fail or
  disagree, the whole model keeps the plain convolutions, and one warning says why. The check
  runs in the U-Net's dtype: oneDNN has bfloat16 kernels only on CPUs with AVX512 or
  AVX-NE-CONVERT (float16: AVX512-FP16 or AVX-NE-CONVERT), so elsewhere such a U-Net runs the
  plain path.
- a table of every ResnetBlock's time bias for all T timesteps, built from the current
  weights (TimeBiasTable): a step does one lookup instead of the sinusoid, two dense layers
  and one dense layer per block.

Each of these is set on the U-Net through its hooks (unet.takes_fast_path): the layers'
`fast_forward`, the UNet's `fast_time_biases`. They are remade from the weights whenever
these change (an EMA update, load_state_dict), so they are never stale. Training is
unaffected: in train mode, or with autograd on, the U-Net uses only its parameters, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .unet import AttentionBlock, Conv2d, UNet, Upsample

log = logging.getLogger(__name__)


def packed_check_tolerance(dtype: torch.dtype) -> float:
    """The largest max |packed - F.conv2d| / max |F.conv2d| that the check at prepare time
    accepts: 1e-4 in float32; in bfloat16 and float16, whose every output is rounded far more
    coarsely, two units in the last place (1.6e-2 for bfloat16). A wrong kernel is off by ~1."""
    return max(1e-4, 2 * torch.finfo(dtype).eps)


def mkldnn_ops() -> tuple[Callable, Callable]:
    """(reorder a conv weight to oneDNN's blocked layout, convolve with such a weight): private
    ops, so looked up here and nowhere else; a test can take them away."""
    ops = torch.ops.mkldnn
    return ops._reorder_convolution_weight, ops._convolution_pointwise


def weights_key(params) -> tuple[tuple[int, int], ...]:
    """Changes whenever a tensor is written in place (_version) or replaced (data_ptr)."""
    return tuple((p.data_ptr(), p._version) for p in params)


# layers -> (weight [C_out, C_in, kh, kw], bias [C_out]) of the conv that PackedConv runs.
KernelDerivation = Callable[[list], tuple[torch.Tensor, torch.Tensor]]


def own_kernel(layers: list[nn.Conv2d]) -> tuple[torch.Tensor, torch.Tensor]:
    (conv,) = layers
    return conv.weight, conv.bias


def folded_attention_kernels(layers: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor]:
    """to_q, to_k, to_v and to_out folded into one 1x1 kernel with 2C outputs over the normed
    input x (rows: tokens; a Linear computes x W^T + b):
    - queries a = x Wq^T Wk + bq Wk, against x itself as keys: a x^T equals q k^T up to the
      per-row constant q bk, which softmax ignores;
    - values v' = x Wv^T Wo^T + (bv Wo^T + bo): attention rows sum to 1, so softmax(...) v'
      is to_out(softmax(...) v).
    Computed in float64, so the folding adds no rounding of its own."""
    (wq, bq), (wk, _), (wv, bv), (wo, bo) = ((layer.weight.double(), layer.bias.double()) for layer in layers)
    weight = torch.cat([wk.T @ wq, wo @ wv])
    bias = torch.cat([wk.T @ bq, wo @ bv + bo])
    dtype = layers[0].weight.dtype
    return weight[:, :, None, None].to(dtype), bias.to(dtype)


# After 2x nearest upsampling, a 3x3 kernel over output rows of parity p reads only two input
# rows: the first through kernel rows PHASE_TAPS[p][0], the second through PHASE_TAPS[p][1]
# (the same for columns). With padding 1 on the input, these two rows are i + p and i + p + 1.
PHASE_TAPS = (((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1)))


def upsample_phase_kernels(layers: list[nn.Conv2d]) -> tuple[torch.Tensor, torch.Tensor]:
    """A 3x3 conv applied after 2x nearest upsampling, as one 2x2 conv of the input (padding 1)
    whose 4 * C_out output channels are the four phases (row parity, column parity, channel)."""
    (conv,) = layers
    # In float64, so that summing up to four taps adds no rounding of its own (in bfloat16 it would).
    taps = torch.tensor(PHASE_TAPS, dtype=torch.float64, device=conv.weight.device)
    weight = torch.einsum("ark,oikl,dsl->adoirs", taps, conv.weight.double(), taps).to(conv.weight.dtype)
    return weight.reshape(4 * conv.out_channels, conv.in_channels, 2, 2), conv.bias.repeat(4)


def interleave_phases(phases: torch.Tensor) -> torch.Tensor:
    """[B, 4C, H+1, W+1] from upsample_phase_kernels' conv -> the upsampled [B, C, 2H, 2W]:
    output pixel (2i+a, 2j+d) is phase (a, d) at (i+a, j+d). channels_last in, channels_last out."""
    b, c4, h1, w1 = phases.shape
    c, h, w = c4 // 4, h1 - 1, w1 - 1
    grid = phases.permute(0, 2, 3, 1).reshape(b, h1, w1, 2, 2, c)
    out = phases.new_empty(b, h, 2, w, 2, c)
    for a in (0, 1):
        for d in (0, 1):
            out[:, :, a, :, d] = grid[:, a:a + h, d:d + w, a, d]
    return out.view(b, 2 * h, 2 * w, c).permute(0, 3, 1, 2)


class PackedConv:
    """A convolution run by oneDNN on a copy of its weight in oneDNN's blocked layout, for
    eval-mode CPU calls without autograd (unet.takes_fast_path). A plain CPU conv reorders its
    weight on every call, which costs about as much as the convolution itself at batch 1.

    `derive` makes the kernel from `layers`: by default one Conv2d's own; others fold layers
    into one conv (the attention projections, an upsampling conv). The copy is remade whenever
    one of the layers' tensors changes (an EMA update, load_state_dict), so it is never stale,
    and training never sees it. Padding and stride are the first layer's if it is a Conv2d,
    else none: a 1x1 conv over channels_last activations is a Linear over their tokens (and
    oneDNN's runs faster than MKL's matrix product on AMD CPUs).

    A Conv2d's fast_forward is its PackedConv itself.
    """

    def __init__(self, layers: list[nn.Conv2d | nn.Linear], derive: KernelDerivation = own_kernel):
        self.layers = layers
        self.derive = derive
        conv = layers[0]
        if isinstance(conv, nn.Conv2d):  # (padding, stride, dilation, groups)
            self.geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        else:
            self.geometry = ([0, 0], [1, 1], [1, 1], 1)
        # (key, weight, bias, the convolution op): all remade together.
        self._packed: tuple[tuple, torch.Tensor, torch.Tensor, Callable] | None = None

    def packed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Callable]:
        key = weights_key(p for layer in self.layers for p in (layer.weight, layer.bias))
        if self._packed is None or self._packed[0] != key:
            with torch.no_grad():
                weight, bias = self.derive(self.layers)
                reorder, convolution = mkldnn_ops()
                # Given an input's size, oneDNN picks the layout its conv will want at any batch
                # size; without one, some 1x1 kernels were reordered again on every call.
                packed = reorder(weight, *self.geometry, list(x.shape))
                self._packed = (key, packed, bias, convolution)
        return self._packed[1:]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias, convolution = self.packed(x)
        return convolution(x, weight, bias, *self.geometry, "none", [], "")

    def __getstate__(self):
        # oneDNN's opaque tensors cannot be copied or pickled; a copy repacks on first use.
        return {**self.__dict__, "_packed": None}


class FoldedAttention:
    """An AttentionBlock's fast_forward: its four projections folded into one 1x1 conv with 2C
    outputs, queries and values, with the normed input itself as keys (folded_attention_kernels):
    half the projection work."""

    def __init__(self, block: AttentionBlock):
        self.block = block
        self.queries_values = PackedConv([block.to_q, block.to_k, block.to_v, block.to_out[0]],
                                         folded_attention_kernels)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.block.group_norm(x)
        # Views of channels_last tensors, [B, heads=1, HW, C] as AttentionBlock's: no copies.
        keys = normed.permute(0, 2, 3, 1).reshape(b, 1, h * w, c)
        queries, values = self.queries_values(normed).permute(0, 2, 3, 1).reshape(b, 1, h * w, 2 * c).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(queries, keys, values)
        # In place: no autograd on this path.
        return out.reshape(b, h, w, c).permute(0, 3, 1, 2).add_(x)


class PhaseUpsample:
    """An Upsample's fast_forward: nearest 2x and its 3x3 conv both done at the input's
    resolution. An output pixel sees only a 2x2 neighbourhood of the input, which depends on
    its row and column parity, so the 3x3 kernel folds into one 2x2 kernel per parity
    (upsample_phase_kernels). One 2x2 conv makes all four: half the multiply-adds, and no
    upsampled copy of the input."""

    def __init__(self, upsample: Upsample):
        self.phases = PackedConv([upsample.conv], upsample_phase_kernels)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return interleave_phases(self.phases(x))


def packed_fast_forward(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The packed fast_forward for one of the U-Net's hooked layers (None: it has none)."""
    if isinstance(module, Conv2d):
        return PackedConv([module])
    if isinstance(module, AttentionBlock):
        return FoldedAttention(module)
    if isinstance(module, Upsample) and module.conv is not None:
        return PhaseUpsample(module)
    return None


def packed_path_fault(dtype: torch.dtype) -> str | None:
    """Why the packed path cannot serve here, or None: one small PackedConv against F.conv2d,
    in the U-Net's dtype (oneDNN has bfloat16 and float16 kernels only for some CPUs)."""
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN (mkldnn)"
    generator = torch.Generator().manual_seed(0)
    # skip_init: no draw from the global generator, which model.load must leave alone.
    conv = torch.nn.utils.skip_init(nn.Conv2d, 8, 8, 3, padding=1, dtype=dtype)
    x = torch.randn(2, 8, 6, 6, generator=generator, dtype=dtype).to(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator, dtype=dtype))
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator, dtype=dtype))
            got = PackedConv([conv])(x)
            expected = F.conv2d(x, conv.weight, conv.bias, padding=1)
            difference = ((got - expected).abs().max() / expected.abs().max()).item()
    except Exception as exc:  # private ops: absent (AttributeError), or changed or broken (anything)
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return f"its private oneDNN ops are missing or failed ({reason})"
    if not difference <= packed_check_tolerance(dtype):  # also catches NaN
        return f"a packed conv disagrees with F.conv2d (max relative difference {difference:.1e})"
    return None


class TimeBiasTable:
    """The UNet's fast_time_biases: every ResnetBlock's time bias for every t in 0..T-1, as one
    [T, sum C_block] tensor.

    Built from the weights it was given; a call rebuilds it if those weights were changed in
    place or replaced since (an EMA update, load_state_dict), so it can never be stale.
    """

    def __init__(self, unet: UNet, num_timesteps: int):
        self.unet = unet
        self.num_timesteps = num_timesteps
        self.source_modules = [unet.time_embedding] + [block.time_emb_proj for block in unet.resnet_blocks()]
        self.build()

    def weights_key(self) -> tuple[tuple[int, int], ...]:
        return weights_key(p for m in self.source_modules for p in m.parameters())

    @torch.no_grad()
    def build(self) -> None:
        t = torch.arange(self.num_timesteps, device=self.unet.conv_in.weight.device)
        biases = self.unet.compute_time_biases(t)
        self.table = torch.cat(biases, dim=1)  # [T, sum C_block]
        self.sizes = [b.shape[1] for b in biases]
        self.key = self.weights_key()

    def __call__(self, t: torch.Tensor) -> list[torch.Tensor]:
        if self.weights_key() != self.key:
            self.build()
        if ((t < 0) | (t >= self.num_timesteps)).any():
            raise ValueError(f"timesteps must be in 0..{self.num_timesteps - 1}, got {t.tolist()}")
        return list(self.table[t.to(self.table.device)].split(self.sizes, dim=1))


def prepare_for_inference(unet: UNet, num_timesteps: int) -> UNet:
    """Prepare `unet` in place for sampling with timesteps 0..num_timesteps-1; returns it."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    unet.eval()
    if unet.conv_in.weight.device.type == "cpu":
        unet.to(memory_format=torch.channels_last)
        fault = packed_path_fault(unet.conv_in.weight.dtype)
        if fault is not None:
            log.warning("U-Net on the plain PyTorch path (no packed oneDNN convolutions): %s", fault)
        for module in unet.modules():
            if isinstance(module, (Conv2d, AttentionBlock, Upsample)):
                module.fast_forward = packed_fast_forward(module) if fault is None else None
    table = unet.fast_time_biases
    # An existing table for the same T stays: it rebuilds itself if the weights changed.
    if not isinstance(table, TimeBiasTable) or table.num_timesteps != num_timesteps:
        unet.fast_time_biases = TimeBiasTable(unet, num_timesteps)
    return unet
