"""The DDPM U-Net (Ho et al. 2020, appendix B), a PixelCNN++-style backbone.

Module names mirror diffusers' UNet2DModel (conv_in, time_embedding, down_blocks, mid_block,
up_blocks, conv_norm_out, conv_out), so a diffusers state dict loads with no renaming and
our checkpoints read like theirs. forward(x[B,C,H,W], t[B]) takes one timestep per sample.

Every ResnetBlock adds dense(swish(temb(t))), which depends on t and the weights only. The
UNet computes these "time biases" for all blocks up front; model.inference precomputes them
for every t (a [T, sum of block channels] table), so a sampling step looks them up instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [B, dim]: sin first, frequencies exp(-k ln(10000) / (dim/2 - 1))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


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
    taps = torch.tensor(PHASE_TAPS, dtype=conv.weight.dtype, device=conv.weight.device)
    weight = torch.einsum("ark,oikl,dsl->adoirs", taps, conv.weight, taps)
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
    eval-mode CPU calls without autograd (see serves). A plain CPU conv reorders its weight on
    every call, which costs about as much as the convolution itself at batch 1.

    `derive` makes the kernel from `layers`: by default one Conv2d's own; others fold layers
    into one conv (the attention projections, an upsampling conv). The copy is remade whenever
    one of the layers' tensors changes (an EMA update, load_state_dict), so it is never stale,
    and training never sees it. Padding and stride are the first layer's if it is a Conv2d,
    else none: a 1x1 conv over channels_last activations is a Linear over their tokens (and
    oneDNN's runs faster than MKL's matrix product on AMD CPUs).
    """

    def __init__(self, layers: list[nn.Conv2d | nn.Linear], derive: KernelDerivation = own_kernel):
        self.layers = layers
        self.derive = derive
        conv = layers[0]
        if isinstance(conv, nn.Conv2d):  # (padding, stride, dilation, groups)
            self.geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        else:
            self.geometry = ([0, 0], [1, 1], [1, 1], 1)
        self._packed: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # (key, weight, bias)

    def serves(self, x: torch.Tensor) -> bool:
        return x.is_cpu and not self.layers[0].training and not torch.is_grad_enabled()

    def packed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = weights_key(p for layer in self.layers for p in (layer.weight, layer.bias))
        if self._packed is None or self._packed[0] != key:
            with torch.no_grad():
                weight, bias = self.derive(self.layers)
                # Given an input's size, oneDNN picks the layout its conv will want at any batch
                # size; without one, some 1x1 kernels were reordered again on every call.
                packed = torch.ops.mkldnn._reorder_convolution_weight(weight, *self.geometry, list(x.shape))
                self._packed = (key, packed, bias)
        return self._packed[1], self._packed[2]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.packed(x)
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *self.geometry, "none", [], "")

    def __getstate__(self):
        # oneDNN's opaque tensors cannot be copied or pickled; a copy repacks on first use.
        return {**self.__dict__, "_packed": None}


class Conv2d(nn.Conv2d):
    """nn.Conv2d whose eval-mode CPU calls run through a PackedConv once prepack() is called."""

    packed: PackedConv | None = None

    def prepack(self) -> None:
        self.packed = PackedConv([self])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and self.packed.serves(x):
            return self.packed(x)
        return super().forward(x)


class TimestepEmbedding(nn.Module):
    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(channels, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(emb)))


class ResnetBlock(nn.Module):
    """GroupNorm -> swish -> conv, + dense(temb), GroupNorm -> swish -> dropout -> conv, + shortcut."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, time_bias: torch.Tensor) -> torch.Tensor:
        """time_bias: [B, out_ch], this block's time_emb_proj(swish(temb)) (see UNet.time_biases)."""
        # In place where autograd allows it (neither GroupNorm nor conv backward reads its
        # output): it saves an activation-sized allocation and a pass over memory per op.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h += time_bias[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        h += x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection.

    After prepack(), eval-mode CPU calls fold the four projections into one 1x1 conv with 2C
    outputs, queries and values, and use the normed input itself as keys
    (folded_attention_kernels): half the projection work.
    """

    packed: PackedConv | None = None

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def prepack(self) -> None:
        self.packed = PackedConv([self.to_q, self.to_k, self.to_v, self.to_out[0]], folded_attention_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.group_norm(x)
        # [B, heads=1, HW, C]: 4-D, so that PyTorch picks its fused (flash) kernel; 3-D inputs
        # fall back to plain math.
        tokens = normed.permute(0, 2, 3, 1).reshape(b, 1, h * w, c)
        if self.packed is not None and self.packed.serves(x):
            # Views of one channels_last [B, H, W, 2C] output: no copies.
            queries, values = self.packed(normed).permute(0, 2, 3, 1).reshape(b, 1, h * w, 2 * c).chunk(2, dim=-1)
            out = F.scaled_dot_product_attention(queries, tokens, values)
        else:
            q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
            out = self.to_out[0](F.scaled_dot_product_attention(q, k, v))
        # In place: linear backward does not read its output; the packed path has no autograd.
        return out.reshape(b, h, w, c).permute(0, 3, 1, 2).add_(x)


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        # TensorFlow 'SAME' padding for a stride-2 conv pads only bottom and right.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """2x nearest-neighbour upsampling, then a 3x3 conv if with_conv.

    After prepack(), eval-mode CPU calls do both at the input's resolution: an output pixel
    sees only a 2x2 neighbourhood of the input, which depends on its row and column parity,
    so the 3x3 kernel folds into one 2x2 kernel per parity (upsample_phase_kernels). One 2x2
    conv makes all four: half the multiply-adds, and no upsampled copy of the input.
    """

    packed: PackedConv | None = None

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1) if with_conv else None

    def prepack(self) -> None:
        if self.conv is not None:
            self.packed = PackedConv([self.conv], upsample_phase_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and self.packed.serves(x):
            return interleave_phases(self.packed(x))
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class DownBlock(nn.Module):
    def __init__(self, in_ch, out_ch, temb_dim, cfg: UNetConfig, attention: bool, downsample: bool):
        super().__init__()
        res = [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, temb_dim, cfg.dropout, cfg.norm_groups, cfg.norm_eps)
               for i in range(cfg.num_res_blocks)]
        self.resnets = nn.ModuleList(res)
        self.attentions = nn.ModuleList(
            [AttentionBlock(out_ch, cfg.norm_groups, cfg.norm_eps) for _ in res] if attention else []
        )
        self.downsamplers = nn.ModuleList([Downsample(out_ch, cfg.resample_with_conv)] if downsample else [])

    def forward(self, h: torch.Tensor, time_biases: Iterator[torch.Tensor], skips: list[torch.Tensor]) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, next(time_biases))
            if self.attentions:
                h = self.attentions[i](h)
            skips.append(h)
        for down in self.downsamplers:
            h = down(h)
            skips.append(h)
        return h


class UpBlock(nn.Module):
    def __init__(self, prev_ch, out_ch, skip_chs: list[int], temb_dim, cfg: UNetConfig, attention: bool, upsample: bool):
        super().__init__()
        res = []
        for i, skip_ch in enumerate(skip_chs):
            in_ch = prev_ch if i == 0 else out_ch
            res.append(ResnetBlock(in_ch + skip_ch, out_ch, temb_dim, cfg.dropout, cfg.norm_groups, cfg.norm_eps))
        self.resnets = nn.ModuleList(res)
        self.attentions = nn.ModuleList(
            [AttentionBlock(out_ch, cfg.norm_groups, cfg.norm_eps) for _ in res] if attention else []
        )
        self.upsamplers = nn.ModuleList([Upsample(out_ch, cfg.resample_with_conv)] if upsample else [])

    def forward(self, h: torch.Tensor, time_biases: Iterator[torch.Tensor], skips: list[torch.Tensor]) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), next(time_biases))
            if self.attentions:
                h = self.attentions[i](h)
        for up in self.upsamplers:
            h = up(h)
        return h


class MidBlock(nn.Module):
    def __init__(self, ch: int, temb_dim: int, cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(ch, ch, temb_dim, cfg.dropout, cfg.norm_groups, cfg.norm_eps) for _ in range(2)]
        )
        self.attentions = nn.ModuleList([AttentionBlock(ch, cfg.norm_groups, cfg.norm_eps)])

    def forward(self, h: torch.Tensor, time_biases: Iterator[torch.Tensor]) -> torch.Tensor:
        h = self.attentions[0](self.resnets[0](h, next(time_biases)))
        return self.resnets[1](h, next(time_biases))


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        ch = config.base_channels
        temb_dim = 4 * ch
        chans = [ch * m for m in config.channel_mult]
        levels = len(chans)

        self.conv_in = Conv2d(config.in_channels, ch, 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch, temb_dim)

        self.down_blocks = nn.ModuleList()
        skip_chs, in_ch, res = [ch], ch, config.image_size
        for level, out_ch in enumerate(chans):
            last = level == levels - 1
            self.down_blocks.append(
                DownBlock(in_ch, out_ch, temb_dim, config, res in config.attention_resolutions, not last)
            )
            skip_chs += [out_ch] * config.num_res_blocks + ([] if last else [out_ch])
            in_ch = out_ch
            res = res if last else res // 2

        self.mid_block = MidBlock(in_ch, temb_dim, config)

        self.up_blocks = nn.ModuleList()
        for level, out_ch in reversed(list(enumerate(chans))):
            skips = [skip_chs.pop() for _ in range(config.num_res_blocks + 1)]
            self.up_blocks.append(
                UpBlock(in_ch, out_ch, skips, temb_dim, config, res in config.attention_resolutions, level > 0)
            )
            in_ch = out_ch
            res = res * 2 if level > 0 else res

        self.conv_norm_out = nn.GroupNorm(config.norm_groups, ch, eps=config.norm_eps)
        self.conv_out = Conv2d(ch, config.out_channels, 3, padding=1)
        self._init_weights()
        # Set by model.inference.prepare_for_inference; never part of the state dict.
        self.time_bias_table: TimeBiasTable | None = None

    def _init_weights(self) -> None:
        # As in the paper's code: near-zero output layers, so every block starts as the identity.
        zero_init = [self.conv_out]
        for module in self.modules():
            if isinstance(module, ResnetBlock):
                zero_init.append(module.conv2)
            elif isinstance(module, AttentionBlock):
                zero_init.append(module.to_out[0])
        for layer in zero_init:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def resnet_blocks(self) -> list[ResnetBlock]:
        """All ResnetBlocks in the order forward calls them (registration order is call order)."""
        return [m for m in self.modules() if isinstance(m, ResnetBlock)]

    def compute_time_biases(self, t: torch.Tensor) -> list[torch.Tensor]:
        """time_emb_proj(swish(temb(t))) [B, C_block] for every ResnetBlock, in call order."""
        temb = F.silu(self.time_embedding(timestep_embedding(t, self.config.base_channels)))
        return [block.time_emb_proj(temb) for block in self.resnet_blocks()]

    def time_biases(self, t: torch.Tensor) -> list[torch.Tensor]:
        # The table holds no gradient, so it serves only eval-mode calls that need none.
        if self.time_bias_table is None or self.training or torch.is_grad_enabled():
            return self.compute_time_biases(t)
        return self.time_bias_table.lookup(self, t)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] in [-1, 1]; t: [B] integer timesteps in 0..T-1. Returns eps_hat [B, C, H, W]."""
        time_biases = iter(self.time_biases(t))
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, time_biases, skips)
        h = self.mid_block(h, time_biases)
        for block in self.up_blocks:
            h = block(h, time_biases, skips)
        # Contiguous whatever the layout inside (channels_last after prepare_for_inference).
        return self.conv_out(F.silu(self.conv_norm_out(h), inplace=True)).contiguous()


class TimeBiasTable:
    """Every ResnetBlock's time bias for every t in 0..T-1, as one [T, sum C_block] tensor.

    Built from the weights it was given; lookup rebuilds it if those weights were changed in
    place or replaced since (an EMA update, load_state_dict), so it can never be stale.
    """

    def __init__(self, unet: UNet, num_timesteps: int):
        self.num_timesteps = num_timesteps
        self.source_modules = [unet.time_embedding] + [block.time_emb_proj for block in unet.resnet_blocks()]
        self.build(unet)

    def weights_key(self) -> tuple[tuple[int, int], ...]:
        return weights_key(p for m in self.source_modules for p in m.parameters())

    @torch.no_grad()
    def build(self, unet: UNet) -> None:
        t = torch.arange(self.num_timesteps, device=unet.conv_in.weight.device)
        biases = unet.compute_time_biases(t)
        self.table = torch.cat(biases, dim=1)  # [T, sum C_block]
        self.sizes = [b.shape[1] for b in biases]
        self.key = self.weights_key()

    def lookup(self, unet: UNet, t: torch.Tensor) -> list[torch.Tensor]:
        if self.weights_key() != self.key:
            self.build(unet)
        if ((t < 0) | (t >= self.num_timesteps)).any():
            raise ValueError(f"timesteps must be in 0..{self.num_timesteps - 1}, got {t.tolist()}")
        return list(self.table[t.to(self.table.device)].split(self.sizes, dim=1))
