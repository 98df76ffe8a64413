#!/usr/bin/env bash
# One command per machine, the same on every machine: torchrun's c10d rendezvous forms
# one world of MACHINES x PROCS_PER_MACHINE ranks; `nodes` follows it unless given (then
# each rank hosts nodes / world nodes: a node group, README "Node groups").
#
#   launch/multinode.sh HEAD_HOST MACHINES PROCS_PER_MACHINE [train.py overrides...]
#   e.g. on each of 4 machines:  launch/multinode.sh node01 4 24 sharing=partial alpha=0.1
#
# HEAD_HOST is any one of the machines (it hosts the rendezvous); no IP lists, no
# per-host edits. Environment: DPSGD_PORT (default 29500), DPSGD_RUN_ID (default
# dpsgd: the same on every machine), PYTHON (default: the repository's .venv if it
# exists, else python3 on PATH),
# GLOO_SOCKET_IFNAME (the interface the machines share, if the default does not reach).
set -euo pipefail
if [ "$#" -lt 3 ]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
head_host=$1 machines=$2 procs=$3
shift 3
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x "$repo/.venv/bin/python" ] && python=$repo/.venv/bin/python
exec "$python" -m torch.distributed.run \
  --nnodes "$machines" --nproc_per_node "$procs" \
  --rdzv-backend c10d --rdzv-endpoint "$head_host:${DPSGD_PORT:-29500}" --rdzv-id "${DPSGD_RUN_ID:-dpsgd}" \
  "$repo/train.py" "$@"  # without nodes=, train.py sets nodes to the world size
