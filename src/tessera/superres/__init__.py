"""Super-resolution networks, weight import, tiling and the cascade; importing the package registers
the SR families."""
from tessera.superres import rrdbnet, srvgg  # noqa: F401  (each registers its family)
