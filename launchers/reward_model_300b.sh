#!/bin/bash
#SBATCH --job-name=ernie45-300b-rm
#SBATCH --nodes=12
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
# Bradley-Terry reward model (DRM; RDRM when the pairs carry references) on ERNIE-4.5-300B-A47B,
# 12 nodes x 8 H100, from the SFT model. Layout as the SFT launcher: TP 8 x PP 6 x EP 8.
#   sbatch launchers/reward_model_300b.sh model.init_from=runs/sft_300b data.path=/data/pairs.jsonl \
#          data.eval_path=/data/pairs_eval.jsonl
# Every argument is passed through as a Hydra override (later ones win).
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
source launchers/common.sh
ernie_launch recipe=reward_model model=ernie45_300b_a47b name=reward_model_300b \
  parallel.tp=8 parallel.pp=6 parallel.ep=8 parallel.etp=1 parallel.sequence_parallel=true \
  parallel.distributed_optimizer=true model.dtype=bf16 \
  data.seq_length=4096 train.global_batch_size=256 train.micro_batch_size=1 train.steps=2000 \
  train.eval_interval=100 optim.lr=5.0e-6 optim.min_lr=5.0e-7 optim.warmup_steps=50 \
  optim.weight_decay=0.0 checkpoint.interval=250 checkpoint.keep_last=2 \
  "$@"
