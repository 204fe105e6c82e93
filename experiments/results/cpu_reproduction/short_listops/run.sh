#!/usr/bin/env bash
# Supplement to the CPU reproduction: LRA's ListOps recipe (lra preset) on short generated ListOps,
# both attentions, seeds 0-2, one thread. Run from the repository root.
set -euo pipefail
here=experiments/results/cpu_reproduction/short_listops
work=runs/cpu_short_listops
python -m experiments.lra.generators.listops --output-dir $work/data/listops-1000 \
    --num-train 4000 --num-val 300 --num-test 300 --min-length 20 --max-length 60 --seed 0
for seed in 0 1 2; do
  for attention in taylorshift softmax; do
    python -m experiments.lra.train --task listops --preset lra --config $here/listops_short.json \
        --data-root $work/data --attention $attention --seed $seed --threads 1 --no-progress \
        --out $work/listops-$attention-seed$seed
  done
done
python -m experiments.lra.summary $work --runs --out $here/results.md
for run in $work/listops-*; do
  mkdir -p $here/runs/$(basename $run)
  cp $run/config.json $run/metrics.csv $run/results.json $here/runs/$(basename $run)/
done
