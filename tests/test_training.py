"""Local training against plain references: batch order, step counts, metrics, optimizer state,
the no-learning baselines, and the matrix-factorization model with its global offset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpsgd.building import build_trainer
from dpsgd.data.datasets import LeafDataset, RatingsDataset
from dpsgd.data.leaf import LeafSplit, LoadReport
from dpsgd.data.ratings import make_synthetic
from dpsgd.models import build_model
from dpsgd.models.flat import flatten_model, num_parameters
from dpsgd.models.mf import MatrixFactorization
from dpsgd.training import BatchStream, ClassificationTask, RatingsTask, Trainer, build_optimizer
from tests.conftest import compose_settings


def _stream(num_examples: int, batch_size: int, seed: int = 0) -> BatchStream:
    return BatchStream(
        (torch.arange(num_examples),), batch_size, torch.Generator().manual_seed(seed)
    )


# ---------------------------------------------------------------- batches and steps


@pytest.mark.parametrize("num_examples,batch_size", [(10, 3), (12, 4), (7, 8)])
def test_each_pass_is_a_permutation_and_the_next_pass_reshuffles(num_examples, batch_size):
    stream = _stream(num_examples, batch_size)
    passes = []
    for _ in range(4):
        seen = torch.cat([stream.next_batch()[0] for _ in range(stream.batches_per_pass)])
        assert sorted(seen.tolist()) == list(range(num_examples))  # every example once per pass
        passes.append(seen.tolist())
    assert len({tuple(p) for p in passes}) > 1  # a fresh shuffle per pass, not one order repeated


def test_last_batch_of_a_pass_is_short_rather_than_spilling_into_the_next():
    stream = _stream(10, 4)
    sizes = [len(stream.next_batch()[0]) for _ in range(6)]
    assert sizes == [4, 4, 2, 4, 4, 2]


class _CountingTask:
    def __init__(self):
        self.batches = []

    def loss(self, model, batch):
        self.batches.append(len(batch[0]))
        return model.weight.sum() * 0.0 + 1.0

    def evaluate(self, model, tensors):
        return {}


@pytest.mark.parametrize(
    "full_epochs,local_steps,expected_steps", [(False, 5, 5), (True, 2, 2 * 4)]
)
def test_full_epochs_counts_whole_passes(full_epochs, local_steps, expected_steps):
    model = torch.nn.Linear(1, 1)
    task = _CountingTask()
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        task,
        _stream(10, 3),
        local_steps=local_steps,
        full_epochs=full_epochs,
    )
    trainer.train_round()
    assert len(task.batches) == expected_steps  # 10 examples in batches of 3: 4 batches per pass
    if full_epochs:
        assert sum(task.batches) == 2 * 10  # two whole passes, each example twice


def test_optimizer_state_is_kept_across_rounds():
    """Adam's moments and step count carry over from one round to the next (never reset)."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 3), torch.randn(32)
    model = torch.nn.Linear(3, 1)
    reference = torch.nn.Linear(3, 1)
    reference.load_state_dict(model.state_dict())

    class Regression:
        def loss(self, m, batch):
            return (m(batch[0]).squeeze(1) - batch[1]).pow(2).mean()

    stream = BatchStream((x, y), 8, torch.Generator().manual_seed(1))
    trainer = Trainer(
        model, torch.optim.Adam(model.parameters(), lr=0.05), Regression(), stream, local_steps=3
    )
    for _ in range(4):
        trainer.train_round()
    # One optimizer stepping through the same 12 batches in a row is the reference.
    optimizer = torch.optim.Adam(reference.parameters(), lr=0.05)
    replay = BatchStream((x, y), 8, torch.Generator().manual_seed(1))
    for _ in range(12):
        batch = replay.next_batch()
        optimizer.zero_grad()
        Regression().loss(reference, batch).backward()
        optimizer.step()
    assert trainer.optimizer.state[model.weight]["step"] == 12
    assert torch.allclose(model.weight, reference.weight) and torch.allclose(
        model.bias, reference.bias
    )


# ---------------------------------------------------------------- metrics against numpy


class _FixedPredictions(torch.nn.Module):
    def __init__(self, predictions):
        super().__init__()
        self.predictions = torch.as_tensor(predictions, dtype=torch.float32)

    def forward(self, user, item):
        return self.predictions[user]


def test_rmse_and_half_star_accuracy_match_numpy():
    rng = np.random.default_rng(3)
    n = 9000  # more than one evaluation batch
    predictions = rng.uniform(-1, 6.5, n).astype(np.float32)
    ratings = rng.integers(1, 11, n) / 2
    result = RatingsTask(regularization=0.0).evaluate(
        _FixedPredictions(predictions),
        (
            torch.arange(n),
            torch.zeros(n, dtype=torch.long),
            torch.tensor(ratings, dtype=torch.float32),
        ),
    )
    rmse = np.sqrt(np.mean((predictions.astype(np.float64) - ratings) ** 2))
    snapped = np.round(np.clip(predictions, 0.5, 5.0) * 2) / 2
    assert result["loss"] == pytest.approx(rmse, rel=1e-5)
    assert result["acc"] == pytest.approx(np.mean(snapped == ratings))


def test_ratings_no_learning_is_the_train_mean_predictor():
    rng = np.random.default_rng(4)
    train_r, test_r = rng.integers(1, 11, 500) / 2, rng.integers(1, 11, 300) / 2

    def as_tensors(r):
        return (
            torch.zeros(len(r)),
            torch.zeros(len(r)),
            torch.tensor(r, dtype=torch.float32),
        )

    result = RatingsTask(0.0).no_learning(as_tensors(train_r), as_tensors(test_r))
    mean = train_r.mean()
    assert result["loss"] == pytest.approx(np.sqrt(np.mean((test_r - mean) ** 2)))
    assert result["acc"] == pytest.approx(np.mean(test_r == np.round(mean * 2) / 2))


def test_classification_no_learning_is_the_majority_class():
    train = (torch.zeros(10), torch.tensor([2, 2, 2, 1, 1, 0, 2, 1, 2, 0]))
    test = (torch.zeros(5), torch.tensor([2, 1, 2, 0, 3]))
    result = ClassificationTask().no_learning(train, test)
    assert result["acc"] == pytest.approx(2 / 5)
    frequency = np.array([0.2, 0.3, 0.5, 0.0])
    expected = -np.mean(np.log(np.maximum(frequency[[2, 1, 2, 0, 3]], 1e-12)))
    assert result["loss"] == pytest.approx(expected)


def test_classification_accuracy_and_cross_entropy_match_a_reference():
    torch.manual_seed(5)
    logits = torch.randn(150, 4)
    labels = torch.randint(0, 4, (150,))

    class Fixed(torch.nn.Module):
        def forward(self, index):
            return logits[index]

    result = ClassificationTask().evaluate(Fixed(), (torch.arange(150), labels))
    log_softmax = logits.double() - torch.logsumexp(logits.double(), dim=1, keepdim=True)
    assert result["loss"] == pytest.approx(
        -log_softmax[torch.arange(150), labels].mean().item(), rel=1e-5
    )
    assert result["acc"] == pytest.approx((logits.argmax(1) == labels).double().mean().item())


# ---------------------------------------------------------------- matrix factorization with mu


def test_mf_prediction_is_offset_plus_dot_plus_biases():
    model = MatrixFactorization(
        5, 7, 3, generator=torch.Generator().manual_seed(0), initial_offset=3.25
    )
    with torch.no_grad():
        model.user_bias.uniform_(-1, 1)
        model.item_bias.uniform_(-1, 1)
    user, item = torch.tensor([0, 4, 2]), torch.tensor([6, 0, 3])
    X, Y = (
        model.user_factors.detach().double().numpy(),
        model.item_factors.detach().double().numpy(),
    )
    b, c = model.user_bias.detach().double().numpy(), model.item_bias.detach().double().numpy()
    expected = [3.25 + X[u] @ Y[i] + b[u] + c[i] for u, i in zip(user.tolist(), item.tolist())]
    assert model(user, item).detach().double().numpy() == pytest.approx(expected, rel=1e-6)


def test_mf_offset_is_one_coordinate_of_the_shared_vector_and_learns():
    model = build_model(
        "mf", {"num_users": 5, "num_items": 7}, seed=0, embedding_dim=3, initial_offset=2.0
    )
    assert num_parameters(model) == (5 + 7) * (3 + 1) + 1
    flat = flatten_model(model)
    assert flat[-1] == 2.0  # averaging the flat vector averages mu like any other parameter
    flat[-1] = 4.0
    assert model.offset.item() == 4.0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    user, item, rating = torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([1.0, 1.0])
    for _ in range(20):
        optimizer.zero_grad()
        RatingsTask(0.05).loss(model, (user, item, rating)).backward()
        optimizer.step()
    assert 1.0 < flat[-1].item() < 3.0  # the offset itself moved from 4 toward the ratings (1)


def test_every_node_starts_its_offset_at_its_own_train_mean_and_the_rest_identical():
    cfg = compose_settings("nodes=4")
    dataset = RatingsDataset(
        make_synthetic(
            1, num_users=40, num_items=30, rank=2, min_ratings=20, max_ratings=30, noise_std=0.3
        ),
        0.7,
    )
    flats = []
    for node in range(4):
        data = dataset.node_data(node, 4, cfg.run.seed, None)
        _, flat = build_trainer(cfg, dataset, data, node)
        assert flat[-1].item() == pytest.approx(data.train[2].double().mean().item(), rel=1e-6)
        flats.append(flat)
    assert all(torch.equal(flats[0][:-1], flat[:-1]) for flat in flats[1:])
    assert len({flat[-1].item() for flat in flats}) == 4


# ---------------------------------------------------------------- evaluation subsets


def _leaf_split(count: int, seed: int) -> LeafSplit:
    rng = np.random.default_rng(seed)
    return LeafSplit(
        images=rng.integers(0, 256, (count, 28, 28), dtype=np.uint8),
        labels=rng.integers(0, 62, count).astype(np.int64),
        users=[f"u{i}" for i in range(count // 10)],
        user_offsets=np.arange(0, count + 1, 10, dtype=np.int64),
    )


def test_test_samples_choose_the_same_seeded_subset_on_every_node():
    dataset = LeafDataset(
        _leaf_split(200, 0), _leaf_split(300, 1), LoadReport(20, 200, 300), 62, False, "writers"
    )
    subsets = [dataset.node_data(node, 4, seed=7, test_samples=50).test for node in range(4)]
    for images, labels in subsets[1:]:
        assert torch.equal(images, subsets[0][0]) and torch.equal(labels, subsets[0][1])
    assert (
        len(subsets[0][1]) == 50 and len(torch.unique(subsets[0][0].reshape(50, -1), dim=0)) == 50
    )
    other_seed = dataset.node_data(0, 4, seed=8, test_samples=50).test
    assert not torch.equal(other_seed[1], subsets[0][1]) or not torch.equal(
        other_seed[0], subsets[0][0]
    )
    whole = dataset.node_data(0, 4, seed=7, test_samples=None).test
    assert len(whole[1]) == 300 and math.isclose(
        len(dataset.node_data(0, 4, 7, 10_000).test[1]), 300
    )


def test_an_optimizer_built_from_the_config_matches_its_keys():
    model = torch.nn.Linear(2, 1)
    optimizer = build_optimizer("sgd", model.parameters(), lr=0.3, momentum=0.5, weight_decay=0.0)
    assert optimizer.param_groups[0]["lr"] == 0.3 and optimizer.param_groups[0]["momentum"] == 0.5


def _adam_reference(
    start: np.ndarray, gradients: list[np.ndarray], lr: float, betas=(0.9, 0.999), eps: float = 1e-8
) -> np.ndarray:
    """Adam (Kingma & Ba, with bias correction) in float64 numpy."""
    p, m, v = (
        start.astype(np.float64),
        np.zeros_like(start, np.float64),
        np.zeros_like(start, np.float64),
    )
    for t, g in enumerate(gradients, start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        p = p - lr * (m / (1 - betas[0] ** t)) / (np.sqrt(v / (1 - betas[1] ** t)) + eps)
    return p


def test_adam_as_built_is_fused_and_matches_a_float64_reference_with_sparse_gradients():
    # MF gradients are zero outside the batch's rows; Adam must still move those coordinates.
    rng = np.random.default_rng(3)
    start = rng.normal(size=50).astype(np.float32)
    gradients = [
        np.where(rng.random(50) < 0.2, rng.normal(size=50), 0.0).astype(np.float32)
        for _ in range(30)
    ]
    weights = torch.nn.Parameter(torch.from_numpy(start.copy()))
    optimizer = build_optimizer("adam", [weights], lr=0.01)
    assert optimizer.param_groups[0]["fused"] is True
    for g in gradients:
        weights.grad = torch.from_numpy(g)
        optimizer.step()
    np.testing.assert_allclose(
        weights.detach().numpy(), _adam_reference(start, gradients, 0.01), atol=1e-5
    )
