"""Every node measures the round it stops after, so a run's final numbers are its end.

Evaluation is periodic (`eval.every`), but nodes do not always stop on an evaluated round:
RWM nodes (and a hybrid run's walk) stop wherever they are when the first node completes
its rounds, and a diverged run stops at its common stop round. A node that stops after a
round that was not evaluated evaluates its model then, once (it has not changed since that
round), and that round's JSONL line gains the metrics. Every node then publishes its
last evaluated record, which rank 0 aggregates into summary.json's `final`.

A node whose model is no longer finite (training diverged) is not measured at its stop:
a model of NaNs scores an accuracy of exactly 0, which would read as a result. Its final
record keeps the round and bytes, without metrics; summary.json's `diverged` says why.
"""

from __future__ import annotations

import math

from dpsgd.divergence import finite_or_none
from dpsgd.node import Node
from dpsgd.run_outputs import EVALUATED_KEYS, publish_at_stop


def evaluate_at_stop(node: Node) -> None:
    """After the node's last round of a loop: its evaluated record of that round, for summary.json's `final`.

    Nothing when the node ran no round in this process (a resumed run that was already complete).
    """
    log = node.recorder.log
    record = log.last_record
    if record is None:
        return
    if not math.isfinite(
        float(node.flat.sum())
    ):  # non-finite exactly when a parameter is (or they overflow)
        record = {key: value for key, value in record.items() if key not in EVALUATED_KEYS}
    elif not node.schedule.due(record["round"]):
        clock = node.clock()
        with clock.phase("eval"):
            metrics = node.evaluate()
        record = log.amend_last(
            {
                **{key: finite_or_none(value) for key, value in metrics.items()},
                "eval_s": record["eval_s"] + clock.seconds["eval_s"],
            }
        )
    sketch = node.recorder.sketch
    publish_at_stop(
        node.recorder.store, node.rank, record, None if sketch is None else sketch(node.flat)
    )
