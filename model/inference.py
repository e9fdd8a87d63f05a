"""Inference-only preparation of a U-Net, done once at load time (model.load does it).

    unet = prepare_for_inference(unet, num_timesteps=1000)
    with torch.inference_mode():
        eps = unet(x, t)        # same call, same state dict, faster

What it does, and why (bench/unet_forward.py measures it):
- eval mode: dropout off.
- channels_last weights on CPU: oneDNN's convolutions run NHWC without reordering the
  activations around every call; each conv then hands channels_last to the next layer, so
  inputs need no conversion. (CUDA is left as is: not measured here.)
- on CPU, every convolution's weight also kept in oneDNN's blocked layout (unet.PackedConv,
  packed at the first call, for its input's size), so that no call reorders it again: the
  largest gain at small batches. Two layers run as
  cheaper, equivalent convolutions (the same function up to float rounding):
  - attention's four projections fold into one 1x1 conv with half their multiply-adds,
    queries and values, with the normed input itself as keys (unet.AttentionBlock);
  - each upsampling conv runs at the input's resolution, one 2x2 kernel per output phase:
    half its multiply-adds, and no upsampled copy (unet.Upsample).
- a table of every ResnetBlock's time bias for all T timesteps, built from the current
  weights (see unet.TimeBiasTable): a step does one lookup instead of the sinusoid, two
  dense layers and one dense layer per block.

The packed kernels and the table are remade from the weights whenever these change (an EMA
update, load_state_dict), so they are never stale. Training is unaffected: in train mode, or with
autograd on, the U-Net uses only its parameters, as before.
"""

from __future__ import annotations

import torch

from .unet import AttentionBlock, Conv2d, TimeBiasTable, UNet, Upsample


def prepare_for_inference(unet: UNet, num_timesteps: int) -> UNet:
    """Prepare `unet` in place for sampling with timesteps 0..num_timesteps-1; returns it."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    unet.eval()
    if unet.conv_in.weight.device.type == "cpu":
        unet.to(memory_format=torch.channels_last)
        if torch.backends.mkldnn.is_available():
            for module in unet.modules():
                if isinstance(module, (Conv2d, AttentionBlock, Upsample)):
                    module.prepack()
    table = unet.time_bias_table
    # An existing table for the same T stays: it rebuilds itself if the weights changed.
    if table is None or table.num_timesteps != num_timesteps:
        unet.time_bias_table = TimeBiasTable(unet, num_timesteps)
    return unet
