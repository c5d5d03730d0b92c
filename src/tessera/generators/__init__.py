"""Generator networks only (no noise schedules, no sampling loops); importing the package registers them."""
from tessera.generators import ar, dit, llamagen, masked, masked_sr, sd_unet, taming_gpt, unet, uvit  # noqa: F401  (each registers its family)
