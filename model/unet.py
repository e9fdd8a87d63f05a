"""The DDPM U-Net (Ho et al. 2020, appendix B), a PixelCNN++-style backbone.

Module names mirror diffusers' UNet2DModel (conv_in, time_embedding, down_blocks, mid_block,
up_blocks, conv_norm_out, conv_out), so a diffusers state dict loads with no renaming and
our checkpoints read like theirs. forward(x[B,C,H,W], t[B]) takes one timestep per sample.

Every ResnetBlock adds dense(swish(temb(t))), which depends on t and the weights only. The
UNet computes these "time biases" for all blocks up front; model.inference precomputes them
for every t (a [T, sum of block channels] table), so a sampling step looks them up instead.

This file is the whole architecture. Its one concession to speed is a hook: Conv2d,
AttentionBlock and Upsample have a `fast_forward`, and the UNet a `fast_time_biases`, that
model.inference may set to a faster function computing the same thing; takes_fast_path says
when a call uses it. Unset, as after construction or training, the plain code below runs.
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


FastPath = Callable[[torch.Tensor], torch.Tensor]


def takes_fast_path(module: nn.Module, fast_path: Callable | None) -> bool:
    """Whether this call may take `fast_path`, a faster equivalent of `module`'s computation that
    model.inference set on it. Only in eval mode with autograd off: a fast path holds copies of
    the weights that carry no gradient. Otherwise, and when none is set, the plain code runs."""
    return fast_path is not None and not module.training and not torch.is_grad_enabled()


class Conv2d(nn.Conv2d):
    """nn.Conv2d, with a hook for model.inference (see takes_fast_path)."""

    fast_forward: FastPath | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if takes_fast_path(self, self.fast_forward):
            return self.fast_forward(x)
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
    """Single-head self-attention over all H*W positions, with a residual connection."""

    fast_forward: FastPath | None = None

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if takes_fast_path(self, self.fast_forward):
            return self.fast_forward(x)
        b, c, h, w = x.shape
        # [B, heads=1, HW, C]: 4-D, so that PyTorch picks its fused (flash) kernel; 3-D inputs
        # fall back to plain math.
        tokens = self.group_norm(x).permute(0, 2, 3, 1).reshape(b, 1, h * w, c)
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        out = self.to_out[0](F.scaled_dot_product_attention(q, k, v))
        # In place: linear backward does not read its output.
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
    """2x nearest-neighbour upsampling, then a 3x3 conv if with_conv."""

    fast_forward: FastPath | None = None

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if takes_fast_path(self, self.fast_forward):
            return self.fast_forward(x)
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
    # t [B] -> time_biases(t), looked up rather than computed: set by model.inference.
    fast_time_biases: Callable[[torch.Tensor], list[torch.Tensor]] | None = None

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

    @property
    def dtype(self) -> torch.dtype:
        """The dtype its layers compute in (model.load may cast the weights to bfloat16)."""
        return self.conv_in.weight.dtype

    def compute_time_biases(self, t: torch.Tensor) -> list[torch.Tensor]:
        """time_emb_proj(swish(temb(t))) [B, C_block] for every ResnetBlock, in call order."""
        # The sinusoid in float32 whatever the weights' dtype: bf16 rounds t = 999 to 1000, and
        # the angles of its high frequencies would keep no digit of their phase.
        sinusoid = timestep_embedding(t, self.config.base_channels).to(self.dtype)
        temb = F.silu(self.time_embedding(sinusoid))
        return [block.time_emb_proj(temb) for block in self.resnet_blocks()]

    def time_biases(self, t: torch.Tensor) -> list[torch.Tensor]:
        if takes_fast_path(self, self.fast_time_biases):
            return self.fast_time_biases(t)
        return self.compute_time_biases(t)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] in [-1, 1]; t: [B] integer timesteps in 0..T-1. Returns eps_hat [B, C, H, W]
        in x's dtype, computed in the weights' dtype: the sampler keeps float32 x_t and eps
        whatever precision the U-Net runs in."""
        time_biases = iter(self.time_biases(t))
        h = self.conv_in(x.to(self.dtype))
        skips = [h]
        for block in self.down_blocks:
            h = block(h, time_biases, skips)
        h = self.mid_block(h, time_biases)
        for block in self.up_blocks:
            h = block(h, time_biases, skips)
        eps = self.conv_out(F.silu(self.conv_norm_out(h), inplace=True))
        # Contiguous whatever the layout inside (channels_last after prepare_for_inference).
        return eps.to(dtype=x.dtype, memory_format=torch.contiguous_format)

