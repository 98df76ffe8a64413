# Node groups on a GPU (device=cuda) next to the same machine's CPU, as run on the lent H100 for
# benchmarks/results/scale_gpu/. Synthetic data shaped like MovieLens (the data sets stay on this
# machine). The device image lacks hydra-core and omegaconf: put copies of hydra/, omegaconf/ and
# antlr4/ from the project's venv in .devsite/ (git-ignored) and carry it. Run from the repo root.
set -x
export PYTHONPATH=$PWD/.devsite:$PWD PYTHONUNBUFFERED=1 DPSGD_CACHE=/tmp/cache
rm -rf /tmp/eq_cpu /tmp/eq_gpu /tmp/ml_cuda /tmp/n1000; nvidia-smi -L; nproc
python3 -c "import torch, hydra, omegaconf; print(torch.__version__, torch.cuda.is_available())"
S="dataset=synthetic dataset.num_items=9724 optimizer.lr=0.25 train.local_steps=9 train.batch_size=8 log.progress=false checkpoint.every=0"
python3 train.py $S dataset.num_users=610 nodes=8 nodes_per_rank=8 rounds=5 eval.every=1 device=cpu hydra.run.dir=/tmp/eq_cpu | tail -1
python3 train.py $S dataset.num_users=610 nodes=8 nodes_per_rank=8 rounds=5 eval.every=1 device=cuda hydra.run.dir=/tmp/eq_gpu | tail -1
python3 benchmarks/gpu_compare.py /tmp/eq_cpu /tmp/eq_gpu | tee $OUT/equal.txt
for dev in cuda cpu; do
  /usr/bin/time -f "%e s wall %M KB" python3 train.py $S dataset.num_users=610 nodes=96 nodes_per_rank=96 rounds=500 device=$dev hydra.run.dir=/tmp/ml_$dev 2>&1 | tail -2 | tee -a $OUT/bench.txt
done
/usr/bin/time -f "%e s wall %M KB" python3 train.py $S dataset.num_users=2000 nodes=1000 nodes_per_rank=1000 rounds=100 device=cuda hydra.run.dir=/tmp/n1000 2>&1 | tail -2 | tee -a $OUT/bench.txt
cp /tmp/ml_cuda/summary.json $OUT/ml_cuda_summary.json; cp /tmp/n1000/summary.json $OUT/n1000_summary.json; cp /tmp/ml_cpu/summary.json $OUT/ml_cpu_summary.json
