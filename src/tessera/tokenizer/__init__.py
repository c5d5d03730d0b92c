"""Image autoencoders and their losses; importing the package registers the tokenizer families."""
from tessera.tokenizer import kl, llamagen_vq, taesd, taming, vq, vqmodel  # noqa: F401  (each registers its family)
