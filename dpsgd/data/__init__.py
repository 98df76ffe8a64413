"""Data sets: parsing once into a memory-mapped cache, splitting, and partitioning.

`partition` assigns users (or writers) to nodes, `cache` parses a source file once per machine so every rank
memory-maps the same arrays, `ratings` holds the rating data sets (synthetic and MovieLens) and the per-user
train/test split, `femnist` and `celeba` the LEAF image sets (`leaf`: what both share), and `datasets` what a
node takes from each, by name (`DATASETS`) or from the user's own (`dataset._target_`)."""
