"""Centralized reference: one model trained on *all* the training data, with the library's parts.

The simplest reference a decentralized run can be compared with. It composes the same
Hydra config as `train.py` (so a preset such as `experiment=femnist` gives the same
model, optimizer, learning rate, batch size, task and test set), puts every node's
training examples on one node, and trains for `--steps` optimizer steps, evaluating on
the test set every `--every` steps. It also prints the task's no-learning baseline
(global-mean RMSE, majority class), so a curve can be read against "learned nothing".

    python benchmarks/centralized.py --steps 5000 --every 500 experiment=femnist data_dir=../shared/data
    python benchmarks/centralized.py --steps 3000 experiment=femnist data_dir=../shared/data optimizer.lr=0.1

Writes one JSON line per evaluation to `--out` (default: stdout only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_dir  # noqa: E402

from dpsgd.building import build_trainer, prepare_data  # noqa: E402
from dpsgd.composition import settings_from  # noqa: E402

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps in all")
    parser.add_argument("--every", type=int, default=250, help="evaluate every N steps")
    parser.add_argument("--out", help="append one JSON line per evaluation to this file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = settings_from(compose(config_name="config", overrides=["nodes=1", *args.overrides]))
    dataset = prepare_data(cfg)
    data = dataset.node_data(0, 1, cfg.run.seed, cfg.eval.test_samples)
    trainer, _ = build_trainer(cfg, dataset, data, rank=0)
    baseline = trainer.task.no_learning(data.train, data.test)
    print(f"{cfg.dataset.name}: {dataset.describe()}; no-learning baseline {baseline}", flush=True)
    trainer.steps_per_round = args.every  # one "round" = the steps between two evaluations
    out = open(args.out, "a") if args.out else None
    start = time.perf_counter()
    for done in range(args.every, args.steps + 1, args.every):
        batch_loss = trainer.train_round()
        test = trainer.evaluate(data.test)
        line = {
            "steps": done,
            "epochs": done * cfg.train.batch_size / len(data.train[0]),
            "batch_loss": batch_loss,
            "test_loss": test["loss"],
            "test_acc": test["acc"],
            "wall_s": time.perf_counter() - start,
            "baseline": baseline,
        }
        print(json.dumps(line), flush=True)
        if out:
            out.write(json.dumps(line) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
