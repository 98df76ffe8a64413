"""A data set of a user's own: dpsgd calls Blobs(seed, cache_dir, **dataset keys) once per machine."""

import numpy as np
import torch

from dpsgd.data.datasets import NodeData


class Blobs:
    """Points around `num_classes` seeded centres; the train points dealt to nodes in blocks, one shared test set."""

    task = "classification"

    def __init__(
        self, seed: int, cache_dir, samples: int = 600, features: int = 4, num_classes: int = 3
    ):
        rng = np.random.default_rng(seed)
        labels = rng.integers(num_classes, size=samples)
        points = rng.normal(scale=3.0, size=(num_classes, features))[labels] + rng.normal(
            size=(samples, features)
        )
        self.x, self.y = torch.tensor(points, dtype=torch.float32), torch.tensor(labels)
        self.train_rows = int(0.8 * samples)  # the rest is the test set
        self.dims = {"num_classes": num_classes, "num_features": features}

    def describe(self) -> str:
        return f"{self.train_rows} train and {len(self.y) - self.train_rows} test points"

    def partition(self, nodes: int, seed: int) -> dict:
        return {
            "nodes": [{"node": n, "samples": len(rows)} for n, rows in enumerate(self._rows(nodes))]
        }

    def node_data(self, node: int, nodes: int, seed: int, test_samples: int | None) -> NodeData:
        rows, test = (
            self._rows(nodes)[node],
            slice(self.train_rows, self.train_rows + (test_samples or len(self.y))),
        )
        return NodeData(train=(self.x[rows], self.y[rows]), test=(self.x[test], self.y[test]))

    def _rows(self, nodes: int) -> list[torch.Tensor]:
        return list(torch.arange(self.train_rows).tensor_split(nodes))
