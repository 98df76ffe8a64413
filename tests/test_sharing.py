"""Sharing methods against plain references: selection, accumulation, masks, merges, encodings."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from dpsgd.averaging import Contribution, merge_fill_own, merge_renormalize
from dpsgd.errors import ConfigError
from dpsgd.seeding import stream_key, torch_generator
from dpsgd.sharing import build_sharing, check_sharing
from dpsgd.sharing.partial import PartialSharing, RandomAlphaSharing, coordinates_to_send
from dpsgd.sharing.selection import (
    decode_indices,
    encode_indices,
    fixed_index_bytes,
    smallest_encoding,
    top_k_indices,
)
from dpsgd.sharing.subsampling import SubsamplingSharing, subsampling_mask
from dpsgd.sharing.wire import (
    HEADER_BYTES,
    INDEX_DTYPES,
    VALUE_TYPES,
    Encoding,
    declared_bytes,
    parse_header,
)
from tests.conftest import compose_config, no_learning_baseline, read_jsonl, run_train


def _options(method: str, **overrides) -> dict:
    """The sharing.* options as conf/ declares them, with overrides."""
    from omegaconf import OmegaConf

    options = OmegaConf.to_container(compose_config(f"sharing={method}").sharing)
    options.pop("name"), options.pop("merge")
    return {**options, **overrides}


def _partial(flat, alpha, **overrides) -> PartialSharing:
    options = _options("partial", **overrides)
    return PartialSharing(
        flat,
        alpha,
        accumulation=options["accumulation"],
        accumulate_averaging_changes=options["accumulate_averaging_changes"],
        metadata_cap=options["metadata_cap"],
    )


def _random_alpha(flat, alpha_list, seed, node, **overrides) -> RandomAlphaSharing:
    options = _options("random_alpha", **overrides)
    return RandomAlphaSharing(
        flat,
        alpha_list,
        seed,
        node,
        accumulation=options["accumulation"],
        accumulate_averaging_changes=options["accumulate_averaging_changes"],
        metadata_cap=options["metadata_cap"],
    )


# --- top-k selection -------------------------------------------------------------------


def test_top_k_counts_large_negative_changes_as_large():
    score = torch.tensor([0.1, -5.0, 2.0, -0.2, 3.0])
    assert top_k_indices(score, 2).tolist() == [1, 4]


def test_top_k_breaks_ties_towards_the_lower_index():
    score = torch.tensor([1.0, -2.0, 2.0, 0.5, -2.0, 2.0])
    assert top_k_indices(score, 2).tolist() == [1, 2]
    assert top_k_indices(score, 3).tolist() == [1, 2, 4]


@pytest.mark.parametrize("seed", range(5))
def test_top_k_matches_a_numpy_stable_sort(seed):
    rng = np.random.default_rng(seed)
    score = rng.integers(-20, 20, size=1000).astype(np.float32)  # many ties
    for k in (1, 7, 100, 999, 1000):
        expected = np.sort(np.argsort(-np.abs(score), kind="stable")[:k])
        assert top_k_indices(torch.from_numpy(score), k).tolist() == expected.tolist()


# --- accumulation modes: a hand-worked 3-round example ------------------------------------
# 4 coordinates, alpha 0.25 -> k = 1. Training changes per round, and the model after the
# (simulated) averaging of round 1, are the same for every mode.
CHANGES = ([1.0, -3.0, 2.0, 0.0], [0.5, 0.0, 0.5, 0.0], [0.0, 0.2, 0.0, 0.0])
AFTER_AVERAGING_ROUND_1 = [0.5, -1.0, 2.0, 4.0]


def _three_rounds(accumulation, averaging):
    flat = torch.zeros(4)
    sharing = _partial(
        flat, 0.25, accumulation=accumulation, accumulate_averaging_changes=averaging
    )
    sent = []
    for round_number, change in enumerate(CHANGES, start=1):
        flat += torch.tensor(change)  # local training
        message = sharing.pack(flat, round_number, degree=2)
        index, values = sharing.decode(message)
        sent.append((index.tolist(), values.tolist()))
        if round_number == 1:
            flat.copy_(torch.tensor(AFTER_AVERAGING_ROUND_1))  # averaging moved the model
        sharing.after_merge(flat)
    return sent, sharing._accumulated.tolist()


def test_score_is_this_rounds_training_change_without_accumulation():
    sent, _ = _three_rounds(accumulation=False, averaging=False)
    # round 2: |change| ties between coordinates 0 and 2; the lower wins.
    assert sent == [([1], [-3.0]), ([0], [1.0]), ([1], [pytest.approx(-0.8)])]


def test_accumulated_training_changes_reset_when_sent():
    sent, accumulated = _three_rounds(accumulation=True, averaging=False)
    # acc: r1 [1,-3,2,0] -> send 1 -> [1,0,2,0]; r2 +[.5,0,.5,0] = [1.5,0,2.5,0] -> send 2;
    # r3 +[0,.2,0,0] = [1.5,.2,0,0] -> send 0 -> [0,.2,0,0]. Averaging never counts.
    assert sent == [([1], [-3.0]), ([2], [2.5]), ([0], [1.0])]
    assert accumulated == pytest.approx([0.0, 0.2, 0.0, 0.0])


def test_total_drift_includes_averaging_changes():
    sent, accumulated = _three_rounds(accumulation=True, averaging=True)
    # r1: send 1, acc [1,0,2,0]; averaging drift [-.5,2,0,4] -> [.5,2,2,4]
    # r2: +[.5,0,.5,0] = [1,2,2.5,4] -> send 3 (value 4) -> [1,2,2.5,0]
    # r3: +[0,.2,0,0] = [1,2.2,2.5,0] -> send 2 (value 2.5) -> [1,2.2,0,0]
    assert sent == [([1], [-3.0]), ([3], [4.0]), ([2], [2.5])]
    assert accumulated == pytest.approx([1.0, 2.2, 0.0, 0.0])


def test_metadata_cap_sends_the_full_model_and_resets_accumulators():
    flat = torch.zeros(10)
    sharing = _partial(flat, 0.5, accumulation=True, metadata_cap=0.5)
    flat += torch.arange(10.0)
    message = sharing.pack(flat, 1, degree=3)
    assert (
        message.encoding == Encoding.FULL and message.values.numel() == 10 and message.index is None
    )
    assert sharing._accumulated.abs().sum() == 0


def test_averaging_switch_without_accumulation_warns_and_has_no_effect():
    with pytest.warns(UserWarning, match="accumulate_averaging_changes"):
        check_sharing("partial", 0.1, {"accumulation": False, "accumulate_averaging_changes": True})
    sharing = _partial(torch.zeros(4), 0.25, accumulation=False, accumulate_averaging_changes=True)
    assert not sharing.accumulate_averaging_changes


# --- random alpha ------------------------------------------------------------------------


def test_random_alpha_draws_uniformly_from_the_list():
    alpha_list = [0.1, 0.2, 0.3, 0.4, 1.0]
    sharing = _random_alpha(torch.zeros(100), alpha_list, seed=3, node=7)
    draws = Counter(sharing.round_alpha() for _ in range(5000))
    assert set(draws) == set(alpha_list)
    assert all(abs(count / 5000 - 0.2) < 0.03 for count in draws.values())


def test_random_alpha_sends_full_model_when_the_draw_reaches_the_cap():
    flat = torch.zeros(1000)
    sharing = _random_alpha(flat, [0.1, 1.0], seed=0, node=0)
    for round_number in range(1, 30):
        flat += torch.randn(1000)
        message = sharing.pack(flat, round_number, degree=4)
        if sharing.last_alpha >= 0.5:
            assert message.encoding == Encoding.FULL and message.values.numel() == 1000
        else:
            assert message.values.numel() == coordinates_to_send(0.1, 1000)
        sharing.after_merge(flat)


def test_random_alpha_sequence_depends_only_on_seed_and_node():
    def sequence(seed, node):
        sharing = _random_alpha(torch.zeros(10), [0.1, 0.2, 0.3], seed=seed, node=node)
        return [sharing.round_alpha() for _ in range(50)]

    assert sequence(1, 2) == sequence(1, 2)
    assert sequence(1, 2) != sequence(1, 3)


# --- sub-sampling ----------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_receiver_regenerates_the_senders_mask(alpha):
    sender = SubsamplingSharing(torch.zeros(5000), alpha, seed=11, node=3)
    receiver = SubsamplingSharing(
        torch.zeros(5000), alpha, seed=99, node=0
    )  # its own seed is irrelevant
    flat = torch.randn(5000)
    global_state = torch.get_rng_state()
    for round_number in range(1, 101):
        message = sender.pack(flat, round_number, degree=4)
        assert message.index is None and message.encoding == Encoding.SEEDED_MASK
        index, values = receiver.decode(message)
        assert torch.equal(index, sender.last_sent_index)
        assert torch.equal(values, flat[index])
    assert torch.equal(
        torch.get_rng_state(), global_state
    )  # masks never touch the global generator


@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.5])
def test_mask_density_is_close_to_alpha(alpha):
    numel = 200_000
    densities = [
        subsampling_mask(stream_key(0, "subsampling", 0, r), numel, alpha).float().mean().item()
        for r in range(10)
    ]
    sigma = math.sqrt(alpha * (1 - alpha) / numel)
    assert all(abs(d - alpha) < 5 * sigma for d in densities)
    assert len(set(densities)) > 1  # a different mask every round


# --- merge rules against float64 references -------------------------------------------------


def _random_partial_round(seed, numel=40, neighbours=4):
    rng = np.random.default_rng(seed)
    own = rng.normal(size=numel)
    degrees = rng.integers(1, 6, size=neighbours)
    own_degree = neighbours
    weights = 1.0 / (1.0 + np.maximum(degrees, own_degree))
    masks = rng.random((neighbours, numel)) < 0.5
    masks[:, 0] = False  # nobody sent coordinate 0
    masks[:, 1] = True  # everybody sent coordinate 1
    values = rng.normal(size=(neighbours, numel))
    own_mask = rng.random(numel) < 0.5
    own_mask[2] = False  # only neighbours have coordinate 2 ...
    masks[:, 2] = True
    return own, degrees, weights, masks, values, own_mask


def _contributions(degrees, weights, masks, values):
    return [
        Contribution(
            weight=float(w),
            degree=int(d),
            index=torch.from_numpy(np.flatnonzero(m)),
            values=torch.from_numpy(v[m].astype(np.float32)),
        )
        for d, w, m, v in zip(degrees, weights, masks, values)
    ]


@pytest.mark.parametrize("seed", range(6))
def test_fill_own_equals_mh_with_missing_values_filled_by_own(seed):
    own, degrees, weights, masks, values, _ = _random_partial_round(seed)
    self_weight = 1.0 - weights.sum()
    expected = self_weight * own + sum(
        w * np.where(m, v, own) for w, m, v in zip(weights, masks, values)
    )
    flat = torch.from_numpy(own.astype(np.float32))
    merge_fill_own(flat, self_weight, _contributions(degrees, weights, masks, values))
    np.testing.assert_allclose(flat.numpy(), expected, atol=1e-5)
    assert flat[0].item() == pytest.approx(own[0], abs=1e-6)


def test_fill_own_with_full_messages_is_plain_metropolis_hastings():
    rng = np.random.default_rng(0)
    own, neighbours = rng.normal(size=30), rng.normal(size=(3, 30))
    weights = np.array([0.2, 0.25, 0.2])
    flat = torch.from_numpy(own.astype(np.float32))
    merge_fill_own(
        flat,
        1 - weights.sum(),
        [
            Contribution(float(w), torch.from_numpy(v.astype(np.float32)))
            for w, v in zip(weights, neighbours)
        ],
    )
    np.testing.assert_allclose(
        flat.numpy(), (1 - weights.sum()) * own + weights @ neighbours, atol=1e-6
    )


def _renormalize_reference(own, degrees, weights, masks, values, own_mask):
    self_weight = 1.0 - weights.sum()
    result = own.copy()
    for c in range(len(own)):
        senders = [j for j in range(len(degrees)) if masks[j, c]]
        if own_mask[c]:
            total = self_weight + sum(weights[j] for j in senders)
            result[c] = (
                self_weight * own[c] + sum(weights[j] * values[j, c] for j in senders)
            ) / total
        elif senders:
            # w_i = 1 / (1 + d_i * sum_{j != i} 1/d_j), exactly as SPEC §4 writes it
            result[c] = sum(
                values[i, c] / (1 + degrees[i] * sum(1 / degrees[j] for j in senders if j != i))
                for i in senders
            )
    return result


@pytest.mark.parametrize("seed", range(6))
def test_renormalize_matches_the_per_coordinate_definition(seed):
    own, degrees, weights, masks, values, own_mask = _random_partial_round(seed)
    expected = _renormalize_reference(own, degrees, weights, masks, values, own_mask)
    flat = torch.from_numpy(own.astype(np.float32))
    merge_renormalize(
        flat,
        1.0 - weights.sum(),
        _contributions(degrees, weights, masks, values),
        own_index=torch.from_numpy(np.flatnonzero(own_mask)),
    )
    np.testing.assert_allclose(flat.numpy(), expected, atol=1e-5)
    assert flat[0].item() == pytest.approx(own[0], abs=1e-6)  # nobody has a new value


def test_renormalize_with_everything_sent_is_plain_metropolis_hastings():
    own, degrees, weights, _, values, _ = _random_partial_round(1)
    flat = torch.from_numpy(own.astype(np.float32))
    contributions = [
        Contribution(float(w), torch.from_numpy(v.astype(np.float32)), None, int(d))
        for w, v, d in zip(weights, values, degrees)
    ]
    merge_renormalize(flat, 1.0 - weights.sum(), contributions, own_index=None)
    np.testing.assert_allclose(
        flat.numpy(), (1 - weights.sum()) * own + weights @ values, atol=1e-5
    )


# --- encodings ------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", [Encoding.INDEX_INT32, Encoding.BITMASK, Encoding.GAP_RICE])
@pytest.mark.parametrize("numel,k", [(1, 1), (13, 5), (1000, 1), (1000, 999), (4099, 300)])
def test_indices_survive_encoding(encoding, numel, k):
    chosen = torch.from_numpy(
        np.sort(np.random.default_rng(numel + k).choice(numel, k, replace=False))
    )
    encoded = encode_indices(chosen, numel, encoding)
    if encoding != Encoding.GAP_RICE:
        assert encoded.numel() * encoded.element_size() == fixed_index_bytes(encoding, k, numel)
    assert torch.equal(decode_indices(encoded, numel, encoding, k), chosen)


@pytest.mark.parametrize(
    "numel,k",
    [
        (217_014, 1),
        (217_014, 100),
        (217_014, 21_701),
        (217_014, 108_507),
        (1_690_046, 52_814),
        (1_690_046, 845_023),
        (1000, 0),
    ],
)
def test_the_smallest_index_form_is_chosen(numel, k):
    chosen = torch.from_numpy(np.sort(np.random.default_rng(k).choice(numel, k, replace=False)))
    encoding, nbytes, _ = smallest_encoding(chosen, numel)
    sizes = {
        form: encode_indices(chosen, numel, form).numel() * INDEX_DTYPES[form].itemsize
        for form in (Encoding.INDEX_INT32, Encoding.BITMASK, Encoding.GAP_RICE)
    }
    assert nbytes == sizes[encoding] == min(sizes.values())


def test_the_gap_code_wins_between_a_few_coordinates_and_half_the_model():
    numel = 217_014
    for k, expected in [
        (0, Encoding.INDEX_INT32),
        (1, Encoding.INDEX_INT32),
        (217, Encoding.GAP_RICE),
        (21_701, Encoding.GAP_RICE),
        (65_104, Encoding.GAP_RICE),
        (108_507, Encoding.BITMASK),
    ]:
        chosen = torch.from_numpy(np.sort(np.random.default_rng(k).choice(numel, k, replace=False)))
        assert smallest_encoding(chosen, numel)[0] == expected, k


def test_partial_message_bytes_are_what_is_sent():
    flat = torch.zeros(217_014)
    sharing = _partial(flat, 0.1)
    flat += torch.randn(217_014)
    message = sharing.pack(flat, 1, degree=4)
    k = coordinates_to_send(0.1, 217_014)
    assert message.data_bytes == 4 * k
    assert message.encoding == Encoding.GAP_RICE  # beats the bitmask and 4k bytes of int32
    assert (
        message.meta_bytes
        == HEADER_BYTES + message.index.numel()
        < HEADER_BYTES + (217_014 + 7) // 8
    )


# --- configuration errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,alpha,options,key",
    [
        ("partial", 0.0, {}, "alpha"),
        ("subsampling", 1.5, {}, "alpha"),
        ("random_alpha", 1.0, {"alpha_list": []}, "sharing.alpha_list"),
        ("random_alpha", 1.0, {"alpha_list": [0.5, 2.0]}, "sharing.alpha_list"),
        ("partial", 0.1, {"merge": "average_harder"}, "sharing.merge"),
        ("gossip", 0.1, {}, "sharing.name"),
    ],
)
def test_invalid_sharing_settings_are_config_errors(name, alpha, options, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_sharing(name, alpha, options)


# --- multi-rank runs of each method: below the global-mean line, and the bytes we expect ---------------

NODES, ROUNDS, SEED = 4, 20, 1


def _expected_message_bytes(
    method, node, round_number, numel, alpha, alpha_sequence
) -> tuple[int, int, int]:
    """(data bytes, least and most meta bytes) of one message: a top-k index's length depends on the set."""
    if method == "partial":
        k = coordinates_to_send(alpha, numel)
        fixed = min(
            fixed_index_bytes(Encoding.INDEX_INT32, k, numel),
            fixed_index_bytes(Encoding.BITMASK, k, numel),
        )
        return 4 * k, HEADER_BYTES + min(1, fixed), HEADER_BYTES + fixed
    if method == "subsampling":
        k = int(
            subsampling_mask(
                stream_key(SEED, "subsampling", node, round_number), numel, alpha
            ).sum()
        )
        return 4 * k, HEADER_BYTES, HEADER_BYTES
    if method == "full":
        return 4 * numel, HEADER_BYTES, HEADER_BYTES
    drawn = alpha_sequence[round_number - 1]
    if drawn >= _options("random_alpha")["metadata_cap"]:
        return 4 * numel, HEADER_BYTES, HEADER_BYTES
    return _expected_message_bytes("partial", node, round_number, numel, drawn, None)


@pytest.mark.parametrize(
    "method,alpha", [("partial", 0.1), ("random_alpha", 1.0), ("subsampling", 0.3)]
)
def test_each_method_learns_and_logs_the_bytes_it_sends(tmp_path, method, alpha):
    overrides = (
        f"sharing={method}",
        f"alpha={alpha}",
        f"nodes={NODES}",
        "topology=ring",
        f"rounds={ROUNDS}",
        "eval.every=5",
        f"seed={SEED}",
        "optimizer.lr=1.0",
        "train.batch_size=32",
    )
    run_train(tmp_path, *overrides)
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    baseline = no_learning_baseline(tmp_path, *overrides)[
        "loss"
    ]  # the global-mean predictor, same split
    assert summary["per_round"][-1]["test_loss"]["mean"] < baseline - 0.05
    numel, degree = summary["num_parameters"], 2
    for node in range(NODES):
        generator = torch_generator(SEED, "random_alpha", node)
        alpha_list = _options("random_alpha")["alpha_list"]
        alphas = [
            alpha_list[torch.randint(len(alpha_list), (1,), generator=generator).item()]
            for _ in range(ROUNDS)
        ]
        data, meta = 0, 0
        for record in read_jsonl(run_dir / "nodes" / f"{node}.jsonl"):
            data_bytes, least_meta, most_meta = _expected_message_bytes(
                method, node, record["round"], numel, alpha, alphas
            )
            data += degree * data_bytes
            assert record["bytes_sent_data"] == data
            assert degree * least_meta <= record["bytes_sent_meta"] - meta <= degree * most_meta
            meta = record["bytes_sent_meta"]
            assert record["bytes_sent_data"] + record["bytes_sent_meta"] == record["bytes_sent"]


def test_partial_with_renormalize_runs(tmp_path):
    overrides = (
        "sharing=partial",
        "alpha=0.2",
        "sharing.merge=renormalize",
        f"nodes={NODES}",
        "topology=ring",
        "rounds=10",
        "eval.every=5",
    )
    run_train(tmp_path, *overrides)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (
        summary["per_round"][-1]["test_loss"]["mean"]
        < no_learning_baseline(tmp_path, *overrides)["loss"]
    )


# --- lighter values on the wire ---------------------------------------------------------------


@pytest.mark.parametrize("values", ["float16", "bfloat16"])
@pytest.mark.parametrize("method,alpha", [("full", 1.0), ("partial", 0.1), ("subsampling", 0.3)])
def test_lighter_values_are_narrowed_on_the_wire_and_widened_on_arrival(values, method, alpha):
    numel = 5000
    flat = torch.randn(numel, generator=torch.Generator().manual_seed(3))
    sender = build_sharing(
        method, flat.clone(), alpha, _options(method, values=values), SEED, node=1
    )
    receiver = build_sharing(
        method, flat.clone(), alpha, _options(method, values=values), SEED, node=0
    )
    moved = flat + 0.1 * torch.randn(numel, generator=torch.Generator().manual_seed(4))
    message = sender.pack(moved, 1, degree=2)
    assert (
        message.values.dtype == VALUE_TYPES[values]
        and message.data_bytes == 2 * message.values.numel()
    )
    assert receiver.check_header(parse_header(message.header())) is None
    index, received = receiver.decode(message)
    expected = moved if index is None else moved[index]
    assert received.dtype == torch.float32
    assert torch.equal(
        received, expected.to(VALUE_TYPES[values]).float()
    )  # exactly the rounded model


def test_a_message_in_another_value_type_is_refused_by_the_receiver():
    flat = torch.randn(100)
    half = build_sharing("full", flat, 1.0, _options("full", values="float16"), SEED, node=1).pack(
        flat, 1, degree=2
    )
    single = build_sharing("full", flat, 1.0, _options("full"), SEED, node=0)
    assert "sharing.values=float32" in single.check_header(parse_header(half.header()))


def test_an_unknown_value_type_is_a_config_error():
    with pytest.raises(ConfigError, match=r"sharing\.values"):
        check_sharing("full", 1.0, {"values": "float8"})


@pytest.mark.parametrize(
    "algorithm,method,alpha,values",
    [
        ("dpsgd", "full", 1.0, "float16"),
        ("dpsgd", "partial", 0.1, "bfloat16"),
        ("rwm", "full", 1.0, "bfloat16"),
    ],
)
def test_runs_with_lighter_values_learn_and_log_two_bytes_per_value(
    tmp_path, algorithm, method, alpha, values
):
    overrides = (
        f"algorithm={algorithm}",
        f"sharing={method}",
        f"alpha={alpha}",
        f"sharing.values={values}",
        f"nodes={NODES}",
        "topology=ring",
        f"rounds={ROUNDS}",
        "eval.every=5",
        f"seed={SEED}",
        "optimizer.lr=1.0",
        "train.batch_size=32",
    )
    run_train(tmp_path, *overrides)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (
        summary["per_round"][-1]["test_loss"]["mean"]
        < no_learning_baseline(tmp_path, *overrides)["loss"] - 0.05
    )
    numel = summary["num_parameters"]
    messages_per_round = (
        2 if algorithm == "dpsgd" else 1
    )  # a ring: two neighbours; a walk: one message
    for node in range(NODES):
        data = 0
        for record in read_jsonl(tmp_path / "run" / "nodes" / f"{node}.jsonl"):
            sent, least_meta, most_meta = _expected_message_bytes(
                method, node, record["round"], numel, alpha, None
            )
            data += messages_per_round * sent // 2  # 2 bytes per value instead of 4
            assert record["bytes_sent_data"] == data
        if method == "full":
            assert record["bytes_sent_meta"] == record["round"] * messages_per_round * HEADER_BYTES


@pytest.mark.parametrize(
    "alpha,encoding",
    [(0.0001, Encoding.INDEX_INT32), (0.1, Encoding.GAP_RICE), (0.5, Encoding.BITMASK)],
)
def test_the_header_describes_the_index_form_a_message_chose(alpha, encoding):
    numel = 10_000
    flat = torch.zeros(numel)
    sharing = build_sharing(
        "partial", flat, alpha, _options("partial", values="bfloat16"), SEED, node=0
    )
    message = sharing.pack(
        flat + torch.randn(numel, generator=torch.Generator().manual_seed(2)), 3, degree=4
    )
    fields = parse_header(message.header())
    assert message.encoding == encoding and fields["encoding"] == int(encoding)
    assert (
        fields["num_index"] == message.index.numel()
        and fields["num_values"] == message.values.numel()
    )
    assert fields["values_type"] == list(VALUE_TYPES).index("bfloat16")
    assert declared_bytes(fields) == (message.data_bytes, message.meta_bytes)
    index, _ = sharing.decode(message)
    assert torch.equal(index, sharing.last_sent_index)
