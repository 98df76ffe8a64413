"""dpsgd: decentralized learning on torch.distributed.

Nodes are ranks; each trains on its own data and gossips its parameters with its
graph neighbours. See README.md for the map of modules.
"""

__version__ = "0.1.0"
