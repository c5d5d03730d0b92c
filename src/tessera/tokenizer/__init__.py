"""Image autoencoders and their losses; importing the package registers the tokenizer families."""
from tessera.tokenizer import vq  # noqa: F401  (registers its family)
