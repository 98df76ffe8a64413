"""Configuration checks, before any rank exists: user mistakes found while they can still be one
clear paragraph naming the key and the fix. Also the run's graph and the notes said at start-up."""

from __future__ import annotations

import os

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dpsgd.algorithms.patterns import PATTERNS
from dpsgd.averaging import AVERAGING_ONLY
from dpsgd.data.datasets import dataset_builder
from dpsgd.errors import ConfigError
from dpsgd.models import model_builder
from dpsgd.seeding import stream_key
from dpsgd.settings import alpha_note, check_known_keys, check_values
from dpsgd.sharing import check_sharing
from dpsgd.topology import DEFAULT_DEGREE, Topology, build_topology, default_degree
from dpsgd.training import check_optimizer

# Topologies drawn from the seed, which `topology.resample_every` can draw anew.
RANDOM_TOPOLOGIES = ("regular", "smallworld")


def check_config(cfg: DictConfig, world_size: int | None = None, choices=None) -> Topology:
    """Find configuration mistakes before any rank trains; return the validated topology.

    `world_size`: the ranks that were started (None before forking them: they follow from the config).
    `choices`: the chosen option of each config group, for refusing keys no config file declares
    (default: Hydra's runtime choices inside a Hydra app; outside one that check is skipped).
    """
    if choices is None and HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
    if choices is not None:
        check_known_keys(cfg, choices)
    check_values(cfg)  # every key's type and range first: the checks below rely on them
    _check_grouping(cfg, ranks_for(cfg) if world_size is None else world_size)
    if cfg.algorithm.name not in PATTERNS:
        raise ConfigError(
            f"algorithm.name={cfg.algorithm.name!r} is not known; choose one of "
            f"{sorted(PATTERNS)}, e.g. `algorithm=dpsgd`."
        )

    dataset_builder(
        cfg.dataset.get("name"), cfg.dataset.get("_target_")
    )  # a known name, or a target that imports
    model_builder(cfg.model.get("name"), cfg.model.get("_target_"))
    check_sharing(cfg.sharing.name, cfg.alpha, group_options(cfg.sharing))
    if cfg.algorithm.name == "rwm" and cfg.sharing.merge in AVERAGING_ONLY:
        raise ConfigError(
            f"sharing.merge={cfg.sharing.merge} applies to D-PSGD, whose nodes average several "
            "neighbours' messages at once; RWM merges each arriving model by age on the coordinates "
            "it carries (SPEC §5). Choose another rule, e.g. `sharing.merge=fill_own` (RWM's "
            "age-weighted average), or use `algorithm=dpsgd`."
        )
    _check_pattern(cfg)
    # No torch computation here: the standalone parent runs this before forking the ranks.
    check_optimizer(cfg.optimizer.name, cfg.optimizer.lr)
    return run_topology(cfg)


def _check_pattern(cfg: DictConfig) -> None:
    """The pattern's own keys and rules (`dpsgd.algorithms.patterns`), and graph resampling."""
    name, pattern = cfg.algorithm.name, PATTERNS[cfg.algorithm.name]
    missing = [key for key in pattern.declared if key not in cfg.algorithm]
    if missing:
        raise ConfigError(
            f"algorithm.name={name} needs the keys {missing} of its config group; choose the "
            f"pattern with `algorithm={name}` (which brings them) rather than `algorithm.name={name}`."
        )
    if pattern.check is not None:
        pattern.check(pattern_options(cfg, pattern.declared), cfg.nodes, cfg.rounds)
    every = resample_every(cfg)
    if every is not None and (name != "dpsgd" or cfg.topology.kind not in RANDOM_TOPOLOGIES):
        raise ConfigError(
            f"topology.resample_every={every} draws a new random graph for D-PSGD, but this run has "
            f"algorithm={name} and topology.kind={cfg.topology.kind}. It needs `algorithm=dpsgd` and "
            f"a random graph (topology.kind one of {list(RANDOM_TOPOLOGIES)}); epidemic draws its own "
            "peers each round, and RWM walks one fixed graph. Otherwise drop topology.resample_every."
        )
    if every is not None and topology_degree(cfg) < 3:
        raise ConfigError(
            f"topology.resample_every={every} with topology.degree={topology_degree(cfg)}: every period "
            "draws a new graph during the run, and graphs of degree below 3 are often disconnected, "
            "which would stop the run midway. Use `topology.degree=3` or more."
        )


def topology_degree(cfg: DictConfig) -> int:
    """`topology.degree`, or when it is left unset (null) the largest valid degree up to 4 for the nodes."""
    degree = cfg.topology.degree
    return default_degree(cfg.topology.kind, cfg.nodes) if degree is None else degree


def config_notes(cfg: DictConfig) -> list[str]:
    """One line for each setting that does not mean what it may seem to: said at start-up and kept in
    the run's config.yaml. Call after check_config (the values are valid)."""
    notes = [note for note in (alpha_note(cfg),) if note]
    degree = topology_degree(cfg)
    if (
        cfg.topology.degree is None
        and cfg.topology.kind in RANDOM_TOPOLOGIES
        and degree != DEFAULT_DEGREE
        and not PATTERNS[cfg.algorithm.name].complete_graph
    ):
        notes.append(
            f"topology.degree={degree}: the largest valid degree up to {DEFAULT_DEGREE} for {cfg.nodes} nodes "
            f"(set topology.degree to choose one)"
        )
    return notes


def resample_every(cfg: DictConfig) -> int | None:
    """`topology.resample_every`: rounds per graph when D-PSGD draws a new one (None: one graph)."""
    return OmegaConf.select(cfg, "topology.resample_every", default=None)


def ranks_for(cfg: DictConfig) -> int:
    """How many ranks a run of `nodes` nodes, `nodes_per_rank` on each, needs (at least one)."""
    return max(1, cfg.nodes // cfg.nodes_per_rank)


def _check_grouping(cfg: DictConfig, world_size: int) -> None:
    per_rank = cfg.nodes_per_rank
    if cfg.nodes % per_rank:
        raise ConfigError(
            f"nodes={cfg.nodes} cannot be split into groups of nodes_per_rank={per_rank}: every rank "
            f"hosts the same number of nodes. Choose nodes_per_rank dividing {cfg.nodes}, e.g. "
            f"`nodes_per_rank={max(d for d in range(1, per_rank + 1) if cfg.nodes % d == 0)}`."
        )
    _check_device(cfg)
    if cfg.nodes != world_size * per_rank:
        raise ConfigError(
            f"nodes={cfg.nodes} with nodes_per_rank={per_rank} needs {cfg.nodes // per_rank} ranks, "
            f"but {world_size} were started. Under torchrun the ranks are nnodes x nproc_per_node: "
            f"give nodes (a multiple of the world size) or start {cfg.nodes // per_rank} ranks."
        )


def _check_device(cfg: DictConfig) -> None:
    """A GPU trains node groups with whole-model sharing; nothing else may depend on one being there."""
    if cfg.device == "cpu":
        return
    if cfg.device != "cuda":
        raise ConfigError(f"device={cfg.device!r} is not known: use `device=cpu` or `device=cuda`.")
    if cfg.nodes_per_rank == 1 or cfg.sharing.name != "full":
        raise ConfigError(
            "device=cuda trains node groups with whole-model messages: set nodes_per_rank above 1 "
            f"and sharing=full (now nodes_per_rank={cfg.nodes_per_rank}, sharing={cfg.sharing.name}), "
            "or use device=cpu."
        )
    # Asked through NVML: a CUDA context in the standalone parent would break the ranks it forks.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    if not torch.cuda.is_available():
        raise ConfigError(
            "device=cuda, but torch sees no CUDA device on this machine. Use `device=cpu`."
        )


def pattern_options(cfg: DictConfig, keys: tuple[str, ...]) -> dict:
    """These `algorithm.*` keys (a pattern declares them), as keyword arguments."""
    return {key: cfg.algorithm[key] for key in keys}


def run_topology(cfg: DictConfig, period: int = 0) -> Topology:
    """The run's graph; with `topology.resample_every`, the graph of that period (period 0: the run's graph).

    Epidemic Learning draws its peers from all nodes, so its graph is the complete one whatever
    `topology.*` says.
    """
    t = cfg.topology
    if PATTERNS[cfg.algorithm.name].complete_graph:
        return build_topology("full", cfg.nodes)
    seed = cfg.seed if period == 0 else stream_key(cfg.seed, "resampled_topology", period)
    return build_topology(
        t.kind, cfg.nodes, seed=seed, degree=t.degree, path=t.path, rewire_p=t.rewire_p
    )


def group_options(group: DictConfig) -> dict:
    """A config group's settings other than its `name`, as plain keyword arguments."""
    options = OmegaConf.to_container(group, resolve=True)
    options.pop("name")
    return options
