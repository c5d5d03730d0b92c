"""Shared layers only: attention, norms, residual blocks. No model lives here."""
from tessera.nn.layers import AttnBlock2d, Downsample, ResBlock2d, Upsample, group_norm

__all__ = ["AttnBlock2d", "Downsample", "ResBlock2d", "Upsample", "group_norm"]
