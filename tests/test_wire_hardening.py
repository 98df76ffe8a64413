"""A peer's header is believed only within what the model allows; a forged one names its sender.

Pure checks first (`check_header`, `check_index`, sub-sampling's count), on valid messages of
every sharing method and on forged fields; then small worlds of ranks where one rank forges
and every other rank ends with a NodeFailure naming it, quickly and without allocating what
the forger declared; then the rendezvous store, which must serve loopback only.
"""

from __future__ import annotations

import faulthandler
import resource
import signal
import socket
import subprocess
import time
from datetime import timedelta

import networkx as nx
import numpy as np
import pytest
import torch
import torch.distributed as dist

from dpsgd.communication import ByteCounters, FailureBoard
from dpsgd.launch import LOOPBACK, RankFailure, spawn
from dpsgd.liveness import Liveness, OpenReceive, RankTable, death_verdict
from dpsgd.node_group import rank_label
from dpsgd.sharing.full import FullSharing
from dpsgd.sharing.partial import PartialSharing
from dpsgd.sharing.selection import encode_indices
from dpsgd.sharing.subsampling import SubsamplingSharing
from dpsgd.sharing.values import WireValues
from dpsgd.sharing.wire import (
    HEADER_BYTES,
    HEADER_FIELDS,
    Encoding,
    Message,
    MessageRejected,
    bitmask_bytes,
    check_header,
    check_index,
    declared_bytes,
    parse_header,
)
from dpsgd.topology import Topology
from dpsgd.transport.rounds import RoundTransport
from dpsgd.transport.walks import HEADER_TAG, ROUTE_TAG, WalkTransport, wire_parts
from tests.conftest import RANK_TEST_TIMEOUT_S

NUMEL = 1000
DEGREE = 3
HUGE = (
    2**31 - 1
)  # the largest an int32 header field holds: 8 GiB of float32 had the receiver believed it
COMM_TIMEOUT_S = 60
FAIL_FAST_S = 30  # well under comm.timeout_s: a forged header is a verdict, not a wait


def _partial(flat: torch.Tensor, alpha: float) -> PartialSharing:
    return PartialSharing(
        flat, alpha, accumulation=False, accumulate_averaging_changes=False, metadata_cap=1.0
    )


def _valid_messages(sharing, rounds=range(1, 4), degree=DEGREE):
    """Messages as `sharing` packs them from a model that changes every round."""
    generator = torch.Generator().manual_seed(0)
    flat = torch.zeros(NUMEL)
    for round_number in rounds:
        flat += torch.randn(NUMEL, generator=generator)
        yield sharing.pack(flat, round_number, degree)


SHARINGS = {
    "full": lambda flat: FullSharing(),
    "partial_gap": lambda flat: _partial(
        flat, 0.02
    ),  # 20 coordinates: ~20 bytes of gap code < 80 of int32
    "partial_one": lambda flat: _partial(flat, 0.001),  # 1 coordinate
    "partial_bitmask": lambda flat: _partial(flat, 0.5),
    "partial_capped": lambda flat: _partial(
        flat, 1.0
    ),  # alpha reaches metadata_cap: a FULL message
    "subsampling": lambda flat: SubsamplingSharing(flat, 0.3, seed=5, node=2),
}


# --- the checks on their own -----------------------------------------------------------------


@pytest.mark.parametrize("name", SHARINGS)
def test_valid_messages_of_every_sharing_method_pass_the_checks(name):
    sender = SHARINGS[name](torch.zeros(NUMEL))
    receiver = SHARINGS[name](torch.zeros(NUMEL))
    for message in _valid_messages(sender):
        fields = parse_header(message.header())
        assert check_header(fields, NUMEL, DEGREE, expected_round=message.round) is None
        assert check_header(fields, NUMEL, DEGREE, min_round=message.round, allow_end=True) is None
        if message.index is not None:
            assert (
                check_index(message.encoding, message.index, message.values.numel(), NUMEL) is None
            )
        if isinstance(receiver, SubsamplingSharing):
            assert receiver.check_header(fields) is None
            index, values = receiver.decode(message)
            assert torch.equal(index, sender.last_sent_index) and torch.equal(
                values, message.values
            )
        assert declared_bytes(fields) == (message.data_bytes, message.meta_bytes)


@pytest.mark.parametrize(
    "seed",
    [
        0,
        1,
        2**31 - 1,
        2**31,
        2**32 - 1,
        2**32,
        2**62 + 2**31,
        2**63 - 1,
        *np.random.default_rng(7).integers(0, 2**63 - 1, size=50, dtype=np.int64).tolist(),
    ],
)
def test_every_63_bit_seed_survives_the_int32_header(seed):
    message = Message(
        round=3,
        degree=DEGREE,
        age=0,
        encoding=Encoding.SEEDED_MASK,
        values=torch.zeros(5),
        seed=seed,
    )
    assert message.header().dtype == torch.int32 and parse_header(message.header())["seed"] == seed


def test_a_grouped_batch_reads_an_int32_index_at_any_byte_offset():
    """Index forms of several senders share one byte tensor; an int32 index after a 5-byte gap code starts at
    an offset no int32 view may start at."""
    transport = RoundTransport(
        0, [0, 0, 0, 0, 1, 1], Topology(nx.complete_graph(6)), NUMEL, COMM_TIMEOUT_S, failures=None
    )  # rank 0 hears nodes 4 and 5 of rank 1
    gap = encode_indices(torch.tensor([3, 500, 999]), NUMEL, Encoding.GAP_RICE)
    int32 = torch.tensor([7], dtype=torch.int32)
    fields = [
        {**_valid_fields(Encoding.GAP_RICE), "num_values": 3, "num_index": gap.numel()},
        {**_valid_fields(Encoding.INDEX_INT32), "num_values": 1, "num_index": 1},
    ]
    assert gap.numel() % 4 != 0
    index = torch.cat([gap, int32.view(torch.uint8)])
    messages = transport._split(1, [4, 5], fields, torch.arange(4.0), index, [gap.numel(), 4])
    assert messages[0].coordinates.tolist() == [3, 500, 999] and messages[1].index.tolist() == [7]


def test_end_is_accepted_only_where_the_rwm_handshake_expects_it():
    end = parse_header(
        Message(
            round=7, degree=DEGREE, age=0, encoding=Encoding.END, values=torch.empty(0)
        ).header()
    )
    assert check_header(end, NUMEL, DEGREE, min_round=7, allow_end=True) is None
    assert declared_bytes(end) == (0, HEADER_BYTES)
    assert "END" in check_header(end, NUMEL, DEGREE, expected_round=7)
    assert "END" in check_header(
        {**end, "num_values": 5}, NUMEL, DEGREE, min_round=7, allow_end=True
    )


def _valid_fields(encoding: Encoding) -> dict[str, int]:
    num_values, num_index = {
        Encoding.FULL: (NUMEL, 0),
        Encoding.INDEX_INT32: (20, 20),
        Encoding.BITMASK: (400, bitmask_bytes(NUMEL)),
        Encoding.SEEDED_MASK: (300, 0),
        Encoding.GAP_RICE: (100, 60),
    }[encoding]
    return {
        "round": 4,
        "degree": DEGREE,
        "age": 0,
        "encoding": int(encoding),
        "values_type": 0,
        "num_values": num_values,
        "num_index": num_index,
        "seed": 123,
    }


FORGERIES = [  # (encoding, field, forged value, words the reason must contain)
    *[
        (encoding, "num_values", value, "num_values")
        for encoding in (
            Encoding.FULL,
            Encoding.INDEX_INT32,
            Encoding.BITMASK,
            Encoding.SEEDED_MASK,
            Encoding.GAP_RICE,
        )
        for value in (-1, NUMEL + 1, HUGE, 2**62, -(2**63))
    ],
    (Encoding.GAP_RICE, "num_values", 0, "GAP_RICE"),  # the empty set travels as int32 (no bytes)
    (Encoding.GAP_RICE, "num_index", 0, "num_index"),  # the Rice parameter byte at least
    (
        Encoding.GAP_RICE,
        "num_index",
        bitmask_bytes(NUMEL) + 1,
        "num_index",
    ),  # a bitmask would be shorter
    (Encoding.GAP_RICE, "num_index", HUGE, "num_index"),
    *[(Encoding.FULL, "values_type", value, "values_type") for value in (-1, 3, 99, HUGE)],
    (Encoding.FULL, "num_values", NUMEL - 1, "FULL"),
    (Encoding.FULL, "num_index", 1, "num_index"),
    (Encoding.INDEX_INT32, "num_index", 21, "num_index"),  # one index per value
    (Encoding.INDEX_INT32, "num_index", -20, "num_index"),
    (Encoding.BITMASK, "num_index", bitmask_bytes(NUMEL) + 1, "num_index"),
    (Encoding.BITMASK, "num_index", HUGE, "num_index"),
    (Encoding.SEEDED_MASK, "num_index", 4, "num_index"),
    *[(Encoding.FULL, "encoding", value, "encoding") for value in (-1, 6, 99, 2**40)],
    (Encoding.FULL, "encoding", int(Encoding.END), "END"),  # D-PSGD has no END
    *[(Encoding.BITMASK, "degree", value, "degree") for value in (DEGREE + 1, 0, -DEGREE, HUGE)],
    *[(Encoding.SEEDED_MASK, "round", value, "round") for value in (3, 5, 0, -4, HUGE)],
    (Encoding.FULL, "age", -1, "age"),
]


@pytest.mark.parametrize("encoding, field, value, words", FORGERIES)
def test_a_forged_header_field_is_rejected_with_its_reason(encoding, field, value, words):
    fields = _valid_fields(encoding)
    assert check_header(fields, NUMEL, DEGREE, expected_round=4) is None
    reason = check_header({**fields, field: value}, NUMEL, DEGREE, expected_round=4)
    assert reason is not None and words in reason, reason
    assert str(value) in reason or field == "encoding"


def test_random_headers_pass_only_with_sizes_the_model_allows():
    """Forged headers of random integer fields: the check never raises, and what it lets through is bounded."""
    rng = np.random.default_rng(0)
    passed = 0
    for trial in range(20_000):
        scale = rng.choice([4, 2**10, 2**20, 2**62])
        forged = {name: int(rng.integers(-scale, scale)) for name in HEADER_FIELDS}
        forged["encoding"] = int(rng.integers(-1, 7))
        if trial % 2:  # keep some fields plausible so the size rules are exercised
            forged.update(
                degree=DEGREE, round=4, age=abs(forged["age"]), values_type=int(rng.integers(0, 3))
            )
            forged["num_values"], forged["num_index"] = (
                int(v) for v in rng.integers(-2, NUMEL + 3, size=2)
            )
            if trial % 4 == 1:
                forged["num_index"] = int(
                    rng.choice([0, forged["num_values"], bitmask_bytes(NUMEL)])
                )
        reason = check_header(forged, NUMEL, DEGREE, expected_round=4)
        if reason is None:
            passed += 1
            data_bytes, meta_bytes = declared_bytes(forged)
            assert (
                0 <= data_bytes <= 4 * NUMEL
                and HEADER_BYTES <= meta_bytes <= HEADER_BYTES + 4 * NUMEL
            )
            assert (
                forged["encoding"] != Encoding.END
                and forged["degree"] == DEGREE
                and forged["round"] == 4
            )
    assert (
        passed > 100
    )  # the plausible half does pass sometimes: the rules are not simply "reject all"


def test_rwm_rounds_may_repeat_but_not_go_back_per_sender():
    fields = _valid_fields(Encoding.FULL)
    assert check_header(fields, NUMEL, DEGREE, min_round=4) is None
    assert check_header(fields, NUMEL, DEGREE, min_round=3) is None
    assert "round" in check_header(fields, NUMEL, DEGREE, min_round=5)
    assert "round" in check_header({**fields, "round": 0}, NUMEL, DEGREE)  # RWM rounds start at 1


INDEX_NUMEL = NUMEL + 3  # a mask with padding bits in its last byte
INDEX_FORGERIES = [  # (encoding, index, num_values, words)
    (Encoding.INDEX_INT32, [-1, 5, 9], 3, "outside"),  # a negative coordinate would wrap around
    (Encoding.INDEX_INT32, [5, 9, INDEX_NUMEL], 3, "outside"),
    (Encoding.INDEX_INT32, [2**31 - 1], 1, "outside"),
    (Encoding.INDEX_INT32, [9, 5, 7], 3, "sorted"),
    (Encoding.INDEX_INT32, [5, 5, 7], 3, "distinct"),
    (Encoding.BITMASK, "three_bits", 4, "sets 3 bits"),
    (Encoding.BITMASK, "padding_bit", 1, "beyond the model"),
]


@pytest.mark.parametrize("encoding, index, num_values, words", INDEX_FORGERIES)
def test_forged_index_coordinates_are_rejected(encoding, index, num_values, words):
    numel = INDEX_NUMEL
    if encoding == Encoding.INDEX_INT32:
        tensor = torch.tensor(index, dtype=torch.int32)
    else:
        tensor = torch.zeros(bitmask_bytes(numel), dtype=torch.uint8)
        if index == "three_bits":
            tensor[0] = 0b1011
        else:
            tensor[-1] = 0b1000  # bit 3 of the last byte: coordinate numel, one past the end
    reason = check_index(encoding, tensor, num_values, numel)
    assert reason is not None and words in reason, reason


def test_a_subsampling_count_disagreement_is_a_rejected_message_not_a_crash():
    sender = SubsamplingSharing(torch.zeros(NUMEL), 0.3, seed=5, node=2)
    receiver = SubsamplingSharing(torch.zeros(NUMEL), 0.3, seed=9, node=0)
    message = next(_valid_messages(sender))
    short = Message(
        round=1,
        degree=DEGREE,
        age=0,
        encoding=Encoding.SEEDED_MASK,
        values=message.values[:-1],
        seed=message.seed,
    )
    reason = receiver.check_header(parse_header(short.header()))
    assert (
        reason is not None
        and "sub-sampling mask" in reason
        and f"num_values={short.values.numel()}" in reason
    )
    with pytest.raises(MessageRejected, match="sub-sampling mask"):
        receiver.decode(short)
    other_encoding = parse_header(
        Message(
            round=1, degree=DEGREE, age=0, encoding=Encoding.FULL, values=torch.zeros(NUMEL)
        ).header()
    )
    assert "SEEDED_MASK" in receiver.check_header(other_encoding)


def test_received_bytes_are_split_into_data_and_meta():
    counters = ByteCounters()
    index_bytes = 0
    for message in _valid_messages(_partial(torch.zeros(NUMEL), 0.02)):
        assert message.encoding == Encoding.GAP_RICE
        counters.count_received(parse_header(message.header()))
        index_bytes += message.index.numel()
    assert counters.recv_data == 3 * 20 * 4
    assert counters.recv_meta == 3 * HEADER_BYTES + index_bytes
    assert counters.recv == counters.recv_data + counters.recv_meta


# --- forging ranks -------------------------------------------------------------------------------

PATH = Topology(nx.path_graph(3))  # 0 - 1 - 2: node 2 hears of the forger only through node 1
PATH_TARGETS = [
    PATH.neighbours(node) for node in range(3)
]  # D-PSGD: every node sends to its neighbours
FORGER, VICTIM = 0, 1  # ranks; with one node per rank, also the nodes
# Node groups: two nodes per rank on the path 0-1-2-3-4-5, so rank 1 (nodes 2-3) hears rank 0 (node 1 -> 2)
# and rank 2 (node 4 -> 3).
GROUP_PATH = Topology(nx.path_graph(6))
GROUP_RANK_OF = [node // 2 for node in range(6)]
GROUP_TARGETS = [GROUP_PATH.neighbours(node) for node in range(6)]
GROUP_LABEL = rank_label(2)
NODE_LABEL = rank_label(1)  # one node per rank: "node 3"


def _join(ctx, label=NODE_LABEL) -> FailureBoard:
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore("pg", ctx.store),
        rank=ctx.rank,
        world_size=ctx.world_size,
        timeout=timedelta(seconds=COMM_TIMEOUT_S),
    )
    return FailureBoard(ctx.store, label)


def _on_path(transport_class, ctx, board: FailureBoard, **options):
    """A RoundTransport or WalkTransport of one node per rank on PATH (rank r hosts node r)."""
    return transport_class(
        ctx.rank, list(range(ctx.world_size)), PATH, NUMEL, COMM_TIMEOUT_S, board, **options
    )


def _in_groups(transport_class, ctx, board: FailureBoard, **options):
    """A RoundTransport or WalkTransport of two nodes per rank on GROUP_PATH."""
    return transport_class(
        ctx.rank, GROUP_RANK_OF, GROUP_PATH, NUMEL, COMM_TIMEOUT_S, board, **options
    )


def _forge_header(message: Message, **fields) -> Message:
    header = message.header()
    for name, value in fields.items():
        header[HEADER_FIELDS.index(name)] = value
    message.header = lambda: header  # what the transport puts on the wire
    return message


def _cap_address_space() -> None:
    """Let the victim allocate a few GiB more than it has, not the 8 GiB the forger declares."""
    with open("/proc/self/status") as status:
        vm_kib = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    limit = (vm_kib + 3 * 2**20) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _assert_everyone_names_the_forger(
    failure: RankFailure, started: float, words: str, label=NODE_LABEL
) -> None:
    assert time.monotonic() - started < FAIL_FAST_S
    assert failure.first_failed == FORGER, failure.errors
    assert words in failure.errors[VICTIM], failure.errors[VICTIM]
    for rank in (VICTIM, 2):
        assert f"{label(FORGER)} failed" in failure.errors[rank], failure.errors[rank]
        assert "Traceback" not in failure.errors[rank]


def _forged_message(forgery: str, sharing, message: Message) -> Message:
    if forgery == "huge_num_values":
        return _forge_header(message, num_values=HUGE)
    if forgery == "wrong_degree":
        return _forge_header(message, degree=PATH.degree(FORGER) + 5)
    if (
        forgery == "corrupt_gap_code"
    ):  # one bit flipped in the unary block: the gap count no longer matches
        index = message.index.clone()
        index[-1] ^= 0b1
        return Message(
            message.round, message.degree, 0, message.encoding, message.values.clone(), index
        )
    if forgery == "truncated_gap_code":  # the header announces the shorter index it then sends
        return Message(
            message.round,
            message.degree,
            0,
            message.encoding,
            message.values.clone(),
            message.index[:-1].clone(),
        )
    if forgery == "float16_values":  # values in another type than the receivers' sharing.values
        return Message(message.round, message.degree, 0, message.encoding, message.values.half())
    # A sub-sampling message one value short of what its seed's mask selects.
    return Message(
        round=message.round,
        degree=message.degree,
        age=0,
        encoding=Encoding.SEEDED_MASK,
        values=message.values[:-1].clone(),
        seed=message.seed,
    )


@pytest.mark.parametrize(
    "forgery, words",
    [
        ("huge_num_values", f"num_values={HUGE}"),
        ("wrong_degree", "degree=6"),
        ("subsampling_count", "sub-sampling mask"),
        ("corrupt_gap_code", "GAP_RICE index is corrupt"),
        ("truncated_gap_code", "GAP_RICE index is corrupt"),
        ("float16_values", "values_type=float16"),
    ],
)
def test_dpsgd_forged_message_ends_the_run_naming_the_forger(forgery, words):
    def node(ctx):
        board = _join(ctx)
        flat = torch.randn(NUMEL)
        if forgery == "subsampling_count":
            sharing = SubsamplingSharing(flat, 0.3, seed=5, node=ctx.rank)
        elif forgery.endswith("gap_code"):
            sharing = _partial(torch.zeros(NUMEL), 0.02)
        else:
            sharing = WireValues(FullSharing(), "float32")
        transport = _on_path(
            RoundTransport, ctx, board, header_check=getattr(sharing, "check_header", None)
        )
        if ctx.rank == VICTIM:
            _cap_address_space()
        for round_number in range(1, 4):
            message = sharing.pack(flat, round_number, PATH.degree(ctx.rank))
            if (
                ctx.rank == FORGER and round_number == 2
            ):  # round 1 shows the checks pass honest messages
                message = _forged_message(forgery, sharing, message)
            for received in transport.exchange({ctx.rank: message}, PATH_TARGETS)[
                ctx.rank
            ].values():
                sharing.decode(received)
        dist.destroy_process_group()

    started = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        spawn(node, 3, timeout_s=RANK_TEST_TIMEOUT_S, grace_s=FAIL_FAST_S, quiet_failures=True)
    _assert_everyone_names_the_forger(failure.value, started, words)


def test_group_forged_header_ends_the_run_naming_the_forging_rank_and_node():
    """Rank 0 (nodes 0-1) announces 8 GiB for node 1's message in its header block to rank 1: rank 1 rejects
    the block naming the rank and the node, and rank 2 names rank 0 too."""

    def rank(ctx):
        board = _join(ctx, GROUP_LABEL)
        transport = _in_groups(RoundTransport, ctx, board)
        if ctx.rank == VICTIM:
            _cap_address_space()
        for round_number in range(1, 4):
            outgoing = {
                node: FullSharing().pack(torch.randn(NUMEL), round_number, GROUP_PATH.degree(node))
                for node in transport.hosted
            }
            if ctx.rank == FORGER and round_number == 2:
                outgoing[1] = _forge_header(outgoing[1], num_values=HUGE)
            transport.exchange(outgoing, GROUP_TARGETS)
        dist.destroy_process_group()

    started = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        spawn(
            rank,
            3,
            timeout_s=RANK_TEST_TIMEOUT_S,
            grace_s=FAIL_FAST_S,
            quiet_failures=True,
            label=GROUP_LABEL,
        )
    _assert_everyone_names_the_forger(
        failure.value,
        started,
        f"rank 0 sent, for node 1, a message that no correct node sends: num_values={HUGE}",
        GROUP_LABEL,
    )


def test_rwm_forged_header_ends_the_run_naming_the_forger():
    def node(ctx):
        transport = _on_path(WalkTransport, ctx, _join(ctx))
        transport.start()
        if ctx.rank == VICTIM:
            _cap_address_space()
        if ctx.rank == FORGER:
            honest = Message(
                round=1,
                degree=PATH.degree(FORGER),
                age=3,
                encoding=Encoding.FULL,
                values=torch.randn(NUMEL),
            )
            transport.send(FORGER, VICTIM, _forge_header(honest, num_values=HUGE))
        transport.ready()  # the victim rejects the header; the others hear that it stopped
        raise AssertionError(f"node {ctx.rank} went on after a forged header")

    started = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        spawn(node, 3, timeout_s=RANK_TEST_TIMEOUT_S, grace_s=FAIL_FAST_S, quiet_failures=True)
    _assert_everyone_names_the_forger(failure.value, started, f"num_values={HUGE}")


@pytest.mark.parametrize(
    "sender, receiver",
    [
        (2, VICTIM),  # a node rank 0 does not host
        (FORGER, 2),  # a node rank 1 does not host
        (HUGE, VICTIM),  # no node at all
        (FORGER, 0),
    ],
)  # rank 0's own node
def test_rwm_forged_routing_pair_ends_the_run_naming_the_forger(sender, receiver):
    """The routing pair before a walk's header names an edge from the sending rank to this one, or the
    message is rejected (its header is honest)."""

    def node(ctx):
        transport = _on_path(WalkTransport, ctx, _join(ctx))
        transport.start()
        if ctx.rank == FORGER:  # by hand: the routing pair, then the header of an honest message
            honest = Message(
                round=1,
                degree=PATH.degree(FORGER),
                age=3,
                encoding=Encoding.FULL,
                values=torch.randn(NUMEL),
            )
            (header, tag), *_ = wire_parts(honest)
            assert tag == HEADER_TAG
            dist.send(torch.tensor([sender, receiver], dtype=torch.int64), VICTIM, tag=ROUTE_TAG)
            dist.send(header, VICTIM, tag=tag)  # the victim reads both before it checks the pair
        transport.ready()
        raise AssertionError(f"node {ctx.rank} went on after a forged routing pair")

    started = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        spawn(node, 3, timeout_s=RANK_TEST_TIMEOUT_S, grace_s=FAIL_FAST_S, quiet_failures=True)
    _assert_everyone_names_the_forger(
        failure.value,
        started,
        f"neighbour {FORGER} sent a message that no correct "
        f"node sends: routing ({sender} -> {receiver}) is not an edge",
    )


# --- a payload longer than its header: gloo aborts the receiver, the run names the sender ----------

LONGER_BY = 7  # values beyond what the header announces: gloo's buffer is the announced size


def _longer_than_announced(message: Message) -> Message:
    """The header of `message` as it is, but LONGER_BY more values on the wire after it."""
    _forge_header(message)  # freezes the honest header
    message.values = torch.cat([message.values, torch.zeros(LONGER_BY, dtype=message.values.dtype)])
    return message


def _assert_the_sender_is_named(
    failure: RankFailure,
    started: float,
    sender: int,
    victim: int,
    label=lambda rank: f"node {rank}",
) -> None:
    """The victim died (gloo aborts it), yet the run ends at once naming the sender, in every witness too
    (the sender itself may be killed first: once the others stopped naming it, the launcher waits no more)."""
    assert time.monotonic() - started < FAIL_FAST_S
    assert failure.first_failed == sender, str(failure)
    assert "sent more than its header announced" in str(
        failure
    ) and f"the first was {label(sender)}" in str(failure)
    assert "SIGABRT" in failure.errors[victim]  # the victim itself could say nothing
    witnesses = [rank for rank in failure.errors if rank not in (sender, victim)]
    assert witnesses
    for rank in witnesses:
        assert f"{label(sender)} failed" in failure.errors[rank], failure.errors[rank]


def test_a_dpsgd_payload_longer_than_its_header_names_the_sender():
    """Node 1 hears node 0 (the forger) and node 2; the abort happens in node 1 and names node 0."""

    def node(ctx):
        faulthandler.disable()  # the victim's abort is expected: no dump of every thread on the console
        board = _join(ctx)
        liveness = Liveness(
            ctx.store, ctx.rank, ctx.world_size, slow_after_s=COMM_TIMEOUT_S
        ).start()
        transport = _on_path(RoundTransport, ctx, board, liveness=liveness)
        for round_number in range(1, 4):
            message = FullSharing().pack(torch.randn(NUMEL), round_number, PATH.degree(ctx.rank))
            if ctx.rank == FORGER and round_number == 2:
                message = _longer_than_announced(message)
            transport.exchange({ctx.rank: message}, PATH_TARGETS)
        raise AssertionError(f"node {ctx.rank} went on after round 3")

    started = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        spawn(node, 3, timeout_s=RANK_TEST_TIMEOUT_S, grace_s=FAIL_FAST_S, quiet_failures=True)
    _assert_the_sender_is_named(failure.value, started, FORGER, VICTIM)
    assert "node 0's values of round 2 (for nodes 0)" in str(failure.value)


def test_a_group_batch_longer_than_its_headers_names_the_sending_rank():
    """Ranks of two nodes on the path 0-1-2-3-4-5: rank 1 hears rank 0 (the forger, node 1 -> 2) and
    rank 2 (node 4 -> 3); rank 0's batch carries more values than its header block announces."""

    def rank(ctx):
        faulthandler.disable()
        board = _join(ctx, GROUP_LABEL)
        liveness = Liveness(
            ctx.store, ctx.rank, ctx.world_size, slow_after_s=COMM_TIMEOUT_S, label=GROUP_LABEL
        ).start()
        transport = _in_groups(RoundTransport, ctx, board, liveness=liveness)
        for round_number in range(1, 4):
            outgoing = {
                node: FullSharing().pack(torch.randn(NUMEL), round_number, GROUP_PATH.degree(node))
                for node in transport.hosted
            }
            if ctx.rank == 0 and round_number == 2:
                outgoing[1] = _longer_than_announced(outgoing[1])
            transport.exchange(outgoing, GROUP_TARGETS)
        raise AssertionError(f"rank {ctx.rank} went on after round 3")

    started = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        spawn(
            rank,
            3,
            timeout_s=RANK_TEST_TIMEOUT_S,
            grace_s=FAIL_FAST_S,
            quiet_failures=True,
            label=GROUP_LABEL,
        )
    _assert_the_sender_is_named(failure.value, started, 0, 1, GROUP_LABEL)
    assert "rank 0 (nodes 0-1)'s values of round 2 (for nodes 1)" in str(failure.value)


def test_a_rwm_payload_longer_than_its_header_names_the_sender():
    """Node 1 receives from nodes 0 and 2 in a thread each, so node 2's header receive is open while
    node 0's (the forger's) payload arrives: the one open payload names its sender."""

    def node(ctx):
        faulthandler.disable()
        board = _join(ctx)
        liveness = Liveness(
            ctx.store, ctx.rank, ctx.world_size, slow_after_s=COMM_TIMEOUT_S
        ).start()
        transport = _on_path(WalkTransport, ctx, board, liveness=liveness)
        transport.start()
        if ctx.rank == FORGER:
            honest = Message(
                round=1,
                degree=PATH.degree(FORGER),
                age=3,
                encoding=Encoding.FULL,
                values=torch.randn(NUMEL),
            )
            transport.send(FORGER, VICTIM, _longer_than_announced(honest))
        transport.ready()
        raise AssertionError(f"node {ctx.rank} went on")

    started = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        spawn(node, 3, timeout_s=RANK_TEST_TIMEOUT_S, grace_s=FAIL_FAST_S, quiet_failures=True)
    _assert_the_sender_is_named(failure.value, started, FORGER, VICTIM)
    assert "node 0's values of round 1 (node 0)" in str(failure.value)


def test_a_group_walk_payload_longer_than_its_header_names_the_sending_rank():
    """RWM with node groups on the path 0-1-2-3-4-5, two nodes per rank: rank 1 hears rank 0 and rank 2
    in a thread each; rank 0 sends node 1's model to node 2 with more values than its header says."""

    def rank(ctx):
        faulthandler.disable()
        board = _join(ctx, GROUP_LABEL)
        liveness = Liveness(
            ctx.store, ctx.rank, ctx.world_size, slow_after_s=COMM_TIMEOUT_S, label=GROUP_LABEL
        ).start()
        transport = _in_groups(WalkTransport, ctx, board, liveness=liveness)
        transport.start()
        if ctx.rank == 0:
            honest = Message(
                round=1,
                degree=GROUP_PATH.degree(1),
                age=3,
                encoding=Encoding.FULL,
                values=torch.randn(NUMEL),
            )
            transport.send(1, 2, _longer_than_announced(honest))
        transport.ready()
        raise AssertionError(f"rank {ctx.rank} went on")

    started = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        spawn(
            rank,
            3,
            timeout_s=RANK_TEST_TIMEOUT_S,
            grace_s=FAIL_FAST_S,
            quiet_failures=True,
            label=GROUP_LABEL,
        )
    _assert_the_sender_is_named(failure.value, started, 0, 1, GROUP_LABEL)
    assert "values of round 1 (node 1)" in str(failure.value)


def _receives(*entries: tuple[int, str, str]) -> list[OpenReceive]:
    return [OpenReceive(peer, kind, what) for peer, kind, what in entries]


def test_a_death_names_the_one_payload_sender_being_received_only_for_gloos_abort():
    table = RankTable(5)
    table.write_receives(1, _receives((0, "payload", "values of round 2")))
    table.write_receives(
        2, _receives((0, "header", "header of round 5"), (3, "header", "header of round 5"))
    )
    table.write_receives(3, _receives((2, "payload", "values of round 9")))
    # RWM: other neighbours' fixed-size headers are open beside the one payload
    table.write_receives(
        4,
        _receives(
            (2, "header", "header"), (0, "payload", "values of round 7"), (3, "header", "header")
        ),
    )
    for rank, code in [
        (1, -signal.SIGABRT),
        (2, -signal.SIGABRT),
        (3, -signal.SIGKILL),
        (4, -signal.SIGABRT),
    ]:
        table.record_death(rank, code)
    assert [table.death_order(rank) for rank in range(5)] == [0, 1, 2, 3, 4]
    sender = death_verdict(table, 1)
    assert (
        sender.node == 0
        and "node 0's values of round 2" in sender.why
        and "announced" in sender.why
    )
    several = death_verdict(
        table, 2
    )  # only headers open: a forged longer header; either could be it
    assert (
        several.node == 2
        and "node 0's header of round 5, node 3's header of round 5" in several.why
    )
    killed = death_verdict(table, 3)  # killed while receiving is no sender's fault
    assert killed.node == 3 and "SIGKILL" in killed.why
    beside_headers = death_verdict(table, 4)
    assert beside_headers.node == 0, beside_headers.why
    assert (
        "node 0's values of round 7 (also open: node 2's header, node 3's header)"
        in beside_headers.why
    )


def test_two_open_payloads_list_both_senders():
    table = RankTable(2)
    table.write_receives(
        1, _receives((0, "payload", "values of round 1"), (7, "payload", "values of round 4"))
    )
    table.record_death(1, -signal.SIGABRT)
    verdict = death_verdict(table, 1)
    assert (
        verdict.node == 1
        and "node 0's values of round 1, node 7's values of round 4" in verdict.why
    )


def test_the_receive_table_keeps_whole_entries_and_counts_the_rest():
    """200 open receives overflow a slot: what is shown reads back exactly, the rest is a count, and the
    one payload is shown first even when written last."""
    table = RankTable(2)
    written = _receives(
        *[(peer, "header", f"header of round {peer}") for peer in range(1000, 1200)],
        (1234567, "payload", "values of round 3"),
    )
    table.write_receives(1, written)
    receives = table.open_receives(1)
    assert receives.shown[0] == written[-1] and receives.payloads == 1
    assert list(receives.shown[1:]) == written[: len(receives.shown) - 1]
    assert len(receives.shown) + receives.more == len(written) and receives.more > 0
    table.record_death(1, -signal.SIGABRT)
    verdict = death_verdict(table, 1)
    assert verdict.node == 1234567 and f"and {receives.more} more)" in verdict.why
    table.write_receives(0, [])
    assert table.open_receives(0).shown == () and table.open_receives(0).more == 0


# --- honest ranks: nothing rejected, received bytes split ------------------------------------


def test_honest_dpsgd_exchanges_of_every_encoding_pass_and_count_received_bytes(tmp_path):
    sharings = [SHARINGS["full"], SHARINGS["partial_gap"], SHARINGS["partial_bitmask"]]

    def model(rank: int, round_number: int) -> torch.Tensor:
        return torch.randn(NUMEL, generator=torch.Generator().manual_seed(rank)) * round_number

    def node(ctx):
        transport = _on_path(RoundTransport, ctx, _join(ctx))
        encodings = []
        for round_number, make in enumerate(sharings, start=1):
            sharing = make(model(ctx.rank, 0))
            sent = sharing.pack(model(ctx.rank, round_number), round_number, PATH.degree(ctx.rank))
            for peer, message in transport.exchange({ctx.rank: sent}, PATH_TARGETS)[
                ctx.rank
            ].items():
                encodings.append(int(message.encoding))
                index, values = sharing.decode(message)
                peer_flat = model(peer, round_number)
                assert torch.equal(values, peer_flat if index is None else peer_flat[index])
        counters = transport.ports[ctx.rank].bytes
        totals = torch.tensor(
            [counters.sent_data, counters.sent_meta, counters.recv_data, counters.recv_meta],
            dtype=torch.int64,
        )
        torch.save((encodings, totals), tmp_path / f"{ctx.rank}.pt")
        dist.destroy_process_group()

    spawn(node, 3, timeout_s=RANK_TEST_TIMEOUT_S)
    result = {rank: torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(3)}
    assert set(result[1][0]) == {Encoding.FULL, Encoding.GAP_RICE, Encoding.BITMASK}
    # Node 1 hears nodes 0 and 2, whose only neighbour it is.
    assert result[1][1][2:].tolist() == (result[0][1][:2] + result[2][1][:2]).tolist()


def _int32_index_message(flat: torch.Tensor, round_number: int, degree: int) -> Message:
    """An honest INDEX_INT32 message (partial sharing picks it only where it is the shortest index form)."""
    chosen = torch.arange(1, NUMEL, 97)
    return Message(
        round_number,
        degree,
        0,
        Encoding.INDEX_INT32,
        flat[chosen].clone(),
        encode_indices(chosen, NUMEL, Encoding.INDEX_INT32),
    )


def test_honest_group_batches_of_mixed_encodings_pass_and_count_each_nodes_bytes_as_alone(tmp_path):
    """Two nodes per rank on a complete graph of 6: every batch between two ranks holds both their nodes'
    messages, each round in two different encodings (index forms back to back in one byte tensor, an int32
    index after a gap code's odd length), and every node hears its rank partner in memory. Each node receives
    exactly what its neighbours packed, and counts the bytes it would have sent and received alone."""
    graph = Topology(nx.complete_graph(6))
    targets = [graph.neighbours(node) for node in range(6)]
    kinds = ["full", "partial_gap", "int32", "partial_bitmask"]

    def kind(node: int, round_number: int) -> str:
        return kinds[(node + round_number) % len(kinds)]

    def model(node: int, round_number: int) -> torch.Tensor:
        return torch.randn(NUMEL, generator=torch.Generator().manual_seed(node)) * round_number

    def pack(node: int, round_number: int) -> Message:
        if kind(node, round_number) == "int32":
            return _int32_index_message(model(node, round_number), round_number, graph.degree(node))
        sharing = SHARINGS[kind(node, round_number)](model(node, 0))
        return sharing.pack(model(node, round_number), round_number, graph.degree(node))

    def rank(ctx):
        transport = RoundTransport(
            ctx.rank, GROUP_RANK_OF, graph, NUMEL, COMM_TIMEOUT_S, _join(ctx, GROUP_LABEL)
        )
        encodings, message_bytes = set(), {}
        for round_number in range(1, len(kinds) + 1):
            outgoing = {node: pack(node, round_number) for node in transport.hosted}
            message_bytes.update(
                {
                    (node, round_number): [message.data_bytes, message.meta_bytes]
                    for node, message in outgoing.items()
                }
            )
            received = transport.exchange(outgoing, targets)
            assert list(received) == transport.hosted
            for node, messages in received.items():
                assert list(messages) == sorted(graph.neighbours(node))
                for peer, message in messages.items():
                    encodings.add(int(message.encoding))
                    index, values = _partial(torch.zeros(NUMEL), 0.5).decode(message)
                    peer_flat = model(peer, round_number)
                    assert torch.equal(values, peer_flat if index is None else peer_flat[index]), (
                        node,
                        peer,
                    )
        counted = {
            node: torch.tensor(
                [
                    port.bytes.sent_data,
                    port.bytes.sent_meta,
                    port.bytes.recv_data,
                    port.bytes.recv_meta,
                ]
            )
            for node, port in transport.ports.items()
        }
        torch.save((sorted(encodings), counted, message_bytes), tmp_path / f"{ctx.rank}.pt")
        dist.destroy_process_group()

    spawn(rank, 3, timeout_s=RANK_TEST_TIMEOUT_S, label=GROUP_LABEL)
    encodings, counted, message_bytes = set(), {}, {}
    for rank_number in range(3):
        rank_encodings, rank_counted, rank_bytes = torch.load(
            tmp_path / f"{rank_number}.pt", weights_only=True
        )
        encodings.update(rank_encodings)
        counted.update(rank_counted)
        message_bytes.update(rank_bytes)
    assert encodings == {Encoding.FULL, Encoding.GAP_RICE, Encoding.INDEX_INT32, Encoding.BITMASK}
    rounds = range(1, len(kinds) + 1)
    for node in range(
        6
    ):  # alone, a node sends its message to each neighbour and hears each neighbour's
        sent = [
            sum(graph.degree(node) * message_bytes[node, r][part] for r in rounds)
            for part in (0, 1)
        ]
        heard = [
            sum(message_bytes[peer, r][part] for peer in graph.neighbours(node) for r in rounds)
            for part in (0, 1)
        ]
        assert counted[node].tolist() == sent + heard, node


def test_honest_rwm_walks_with_checks_pass_and_count_received_bytes(tmp_path):
    rounds = 4

    def node(ctx):
        board = _join(ctx)
        flat = torch.randn(NUMEL)
        sharing = SubsamplingSharing(flat, 0.3, seed=5, node=ctx.rank)
        transport = _on_path(WalkTransport, ctx, board, header_check=sharing.check_header)
        transport.start()
        if ctx.rank == FORGER:  # here an honest sender: rounds 1..4 to node 1, then END
            for round_number in range(1, rounds + 1):
                message = sharing.pack(flat, round_number, PATH.degree(ctx.rank), age=round_number)
                message.values = (
                    message.values.clone()
                )  # the next pack reuses the buffer while this one flies
                transport.send(FORGER, VICTIM, message)
        if (
            ctx.rank != VICTIM
        ):  # an END reaching node 1 early would stop its walk before it heard all four
            ctx.store.wait(["received"], timedelta(seconds=COMM_TIMEOUT_S))
        else:
            for round_number in range(1, rounds + 1):
                ready = transport.ready()
                assert (
                    ready is not None
                    and list(ready) == [VICTIM]
                    and ready[VICTIM].round == round_number
                )
                index, values = sharing.decode(ready[VICTIM])
                assert torch.equal(values, ready[VICTIM].values) and index.numel() == values.numel()
            ctx.store.set("received", "yes")
        transport.close()
        counters = transport.ports[ctx.rank].bytes
        torch.save(
            torch.tensor(
                [counters.sent_data, counters.sent_meta, counters.recv_data, counters.recv_meta]
            ),
            tmp_path / f"{ctx.rank}.pt",
        )
        dist.destroy_process_group()

    spawn(node, 3, timeout_s=RANK_TEST_TIMEOUT_S)
    sent = torch.load(tmp_path / f"{FORGER}.pt", weights_only=True).tolist()
    received = torch.load(tmp_path / f"{VICTIM}.pt", weights_only=True).tolist()
    node_2_sent = torch.load(tmp_path / "2.pt", weights_only=True).tolist()
    # Node 1 hears node 0's messages and END, and node 2's END (a header only).
    assert received[2:] == [sent[0], sent[1] + node_2_sent[1]]


# --- the rendezvous store --------------------------------------------------------------------


def _non_loopback_address() -> str | None:
    """An IPv4 address of this machine other than loopback, or None."""
    candidates = []
    try:
        candidates += subprocess.run(
            ["hostname", "-I"], capture_output=True, text=True, timeout=5
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        candidates += socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        pass
    for address in candidates:
        if ":" in address or address.startswith("127."):
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((address, 0))  # only an address of this machine can be bound
            except OSError:
                continue
        return address
    return None


def test_the_rendezvous_store_serves_loopback_only():
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")

    def node(ctx):
        port = ctx.store.port
        try:
            socket.create_connection((address, port), timeout=5).close()
        except ConnectionRefusedError:
            refused = True
        else:
            refused = False
        ctx.store.set("via_loopback", "works")  # this rank's own connection is on loopback
        assert ctx.store.get("via_loopback") == b"works"
        with socket.create_connection((LOOPBACK, port), timeout=5):
            pass
        assert refused, f"the store on port {port} accepted a connection to {address}"

    spawn(node, 1, timeout_s=60)
