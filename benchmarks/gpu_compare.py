"""Per-node JSONL of a CPU and a CUDA run of the same node group: bytes equal, losses to float tolerance."""

import json
import sys

a, b = sys.argv[1], sys.argv[2]
worst = 0.0
for n in range(8):
    ra = [json.loads(line) for line in open(f"{a}/nodes/{n}.jsonl")]
    rb = [json.loads(line) for line in open(f"{b}/nodes/{n}.jsonl")]
    for x, y in zip(ra, rb):
        assert x["bytes_sent"] == y["bytes_sent"] and x["bytes_recv"] == y["bytes_recv"]
        for k in ("test_loss", "batch_loss", "train_loss"):
            worst = max(worst, abs(x[k] - y[k]) / abs(x[k]))
print("cpu vs cuda, 8 nodes x 5 rounds: bytes equal; max relative difference of losses", worst)
