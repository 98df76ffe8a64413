"""Configuration checks, before any rank exists: user mistakes found while they can still be one
clear paragraph naming the key and the fix. Also the run's graph and the notes said at start-up."""

from __future__ import annotations

import os

import torch

from dpsgd.algorithms.patterns import PATTERNS
from dpsgd.averaging import AVERAGING_ONLY
from dpsgd.data.datasets import dataset_builder
from dpsgd.errors import ConfigError
from dpsgd.models import model_builder
from dpsgd.seeding import stream_key
from dpsgd.settings import Settings
from dpsgd.sharing import alpha_note, check_sharing
from dpsgd.topology import DEFAULT_DEGREE, Topology, build_topology, default_degree
from dpsgd.training import check_optimizer

# Topologies drawn from the seed, which `topology.resample_every` can draw anew.
RANDOM_TOPOLOGIES = ("regular", "smallworld")


def check_config(settings: Settings, world_size: int | None = None) -> Topology:
    """Find mistakes across keys before any rank trains; return the validated topology. Each key's
    type and range were checked when the settings were made (`dpsgd.composition.settings_from`).

    `world_size`: the ranks that were started (None before forking them: they follow from the config).
    """
    _check_grouping(settings, ranks_for(settings) if world_size is None else world_size)
    if settings.algorithm.name not in PATTERNS:
        raise ConfigError(
            f"algorithm.name={settings.algorithm.name!r} is not known; choose one of "
            f"{sorted(PATTERNS)}, e.g. `algorithm=dpsgd`."
        )

    dataset_builder(
        settings.dataset.name, settings.dataset.target
    )  # known, or a target that imports
    model_builder(settings.model.name, settings.model.target)
    check_sharing(settings.sharing.name, settings.run.alpha, settings.sharing.options)
    if settings.algorithm.name == "rwm" and settings.sharing.merge in AVERAGING_ONLY:
        raise ConfigError(
            f"sharing.merge={settings.sharing.merge} applies to D-PSGD, whose nodes average several "
            "neighbours' messages at once; RWM merges each arriving model by age on the coordinates "
            "it carries (SPEC §5). Choose another rule, e.g. `sharing.merge=fill_own` (RWM's "
            "age-weighted average), or use `algorithm=dpsgd`."
        )
    _check_pattern(settings)
    # No torch computation here: the standalone parent runs this before forking the ranks.
    check_optimizer(settings.optimizer.name, settings.optimizer.lr)
    return run_topology(settings)


def _check_pattern(settings: Settings) -> None:
    """The pattern's own keys and rules (`dpsgd.algorithms.patterns`), and graph resampling."""
    name, pattern = settings.algorithm.name, PATTERNS[settings.algorithm.name]
    missing = [key for key in pattern.declared if key not in settings.algorithm.options]
    if missing:
        raise ConfigError(
            f"algorithm.name={name} needs the keys {missing} of its config group; choose the "
            f"pattern with `algorithm={name}` (which brings them) rather than `algorithm.name={name}`."
        )
    if pattern.check is not None:
        pattern.check(
            pattern_options(settings, pattern.declared), settings.run.nodes, settings.run.rounds
        )
    every = settings.topology.resample_every
    if every is not None and (name != "dpsgd" or settings.topology.kind not in RANDOM_TOPOLOGIES):
        raise ConfigError(
            f"topology.resample_every={every} draws a new random graph for D-PSGD, but this run has "
            f"algorithm={name} and topology.kind={settings.topology.kind}. It needs `algorithm=dpsgd` and "
            f"a random graph (topology.kind one of {list(RANDOM_TOPOLOGIES)}); epidemic draws its own "
            "peers each round, and RWM walks one fixed graph. Otherwise drop topology.resample_every."
        )
    if every is not None and topology_degree(settings) < 3:
        raise ConfigError(
            f"topology.resample_every={every} with topology.degree={topology_degree(settings)}: every period "
            "draws a new graph during the run, and graphs of degree below 3 are often disconnected, "
            "which would stop the run midway. Use `topology.degree=3` or more."
        )


def topology_degree(settings: Settings) -> int:
    """`topology.degree`, or when it is left unset (null) the largest valid degree up to 4 for the nodes."""
    degree = settings.topology.degree
    return default_degree(settings.topology.kind, settings.run.nodes) if degree is None else degree


def config_notes(settings: Settings) -> list[str]:
    """One line for each setting that does not mean what it may seem to: said at start-up and kept in
    the run's config.yaml. Call after check_config (the values are valid)."""
    notes = [note for note in (alpha_note(settings.sharing.name, settings.run.alpha),) if note]
    degree = topology_degree(settings)
    if (
        settings.topology.degree is None
        and settings.topology.kind in RANDOM_TOPOLOGIES
        and degree != DEFAULT_DEGREE
        and not PATTERNS[settings.algorithm.name].complete_graph
    ):
        notes.append(
            f"topology.degree={degree}: the largest valid degree up to {DEFAULT_DEGREE} for {settings.run.nodes} nodes "
            f"(set topology.degree to choose one)"
        )
    return notes


def ranks_for(settings: Settings) -> int:
    """How many ranks a run of `nodes` nodes, `nodes_per_rank` on each, needs (at least one)."""
    return max(1, settings.run.nodes // settings.run.nodes_per_rank)


def _check_grouping(settings: Settings, world_size: int) -> None:
    per_rank = settings.run.nodes_per_rank
    if settings.run.nodes % per_rank:
        raise ConfigError(
            f"nodes={settings.run.nodes} cannot be split into groups of nodes_per_rank={per_rank}: every rank "
            f"hosts the same number of nodes. Choose nodes_per_rank dividing {settings.run.nodes}, e.g. "
            f"`nodes_per_rank={max(d for d in range(1, per_rank + 1) if settings.run.nodes % d == 0)}`."
        )
    _check_device(settings)
    if settings.run.nodes != world_size * per_rank:
        raise ConfigError(
            f"nodes={settings.run.nodes} with nodes_per_rank={per_rank} needs {settings.run.nodes // per_rank} ranks, "
            f"but {world_size} were started. Under torchrun the ranks are nnodes x nproc_per_node: "
            f"give nodes (a multiple of the world size) or start {settings.run.nodes // per_rank} ranks."
        )


def _check_device(settings: Settings) -> None:
    """A GPU trains node groups with whole-model sharing; nothing else may depend on one being there."""
    if settings.run.device == "cpu":
        return
    if settings.run.device != "cuda":
        raise ConfigError(
            f"device={settings.run.device!r} is not known: use `device=cpu` or `device=cuda`."
        )
    if settings.run.nodes_per_rank == 1 or settings.sharing.name != "full":
        raise ConfigError(
            "device=cuda trains node groups with whole-model messages: set nodes_per_rank above 1 "
            f"and sharing=full (now nodes_per_rank={settings.run.nodes_per_rank}, sharing={settings.sharing.name}), "
            "or use device=cpu."
        )
    # Asked through NVML: a CUDA context in the standalone parent would break the ranks it forks.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    if not torch.cuda.is_available():
        raise ConfigError(
            "device=cuda, but torch sees no CUDA device on this machine. Use `device=cpu`."
        )


def pattern_options(settings: Settings, keys: tuple[str, ...]) -> dict:
    """These `algorithm.*` keys (a pattern declares them), as keyword arguments."""
    return {key: settings.algorithm.options[key] for key in keys}


def run_topology(settings: Settings, period: int = 0) -> Topology:
    """The run's graph; with `topology.resample_every`, the graph of that period (period 0: the run's graph).

    Epidemic Learning draws its peers from all nodes, so its graph is the complete one whatever
    `topology.*` says.
    """
    t = settings.topology
    if PATTERNS[settings.algorithm.name].complete_graph:
        return build_topology("full", settings.run.nodes)
    seed = (
        settings.run.seed
        if period == 0
        else stream_key(settings.run.seed, "resampled_topology", period)
    )
    return build_topology(
        t.kind, settings.run.nodes, seed=seed, degree=t.degree, path=t.path, rewire_p=t.rewire_p
    )
