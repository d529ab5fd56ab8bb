#!/bin/bash
#SBATCH --job-name=ernie45-300b-sft
#SBATCH --nodes=12
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=72:00:00
#SBATCH --output=logs/%x-%j.out
# SFT of ERNIE-4.5-300B-A47B on 12 nodes x 8 H100 (96 GPUs, BF16, the report's SFT footprint).
# Layout: TP 8 (inside a node) x PP 6 (9 layers per stage) x EP 8, distributed optimizer.
#   sbatch launchers/sft_300b.sh model.init_from=/ckpt/ERNIE-4.5-300B-A47B-PT data.path=/data/sft.jsonl
# Every argument is passed through as a Hydra override (later ones win).
# data.pack=false: packing on the TE spec needs PackedSeqParams (not implemented; the loop refuses).
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
source launchers/common.sh
ernie_launch recipe=sft model=ernie45_300b_a47b name=sft_300b \
  parallel.tp=8 parallel.pp=6 parallel.ep=8 parallel.etp=1 parallel.sequence_parallel=true \
  parallel.distributed_optimizer=true model.dtype=bf16 \
  data.seq_length=8192 data.pack=false train.global_batch_size=128 train.micro_batch_size=1 train.steps=4000 \
  optim.lr=1.0e-5 optim.min_lr=1.0e-6 optim.warmup_steps=100 checkpoint.interval=250 \
  "$@"
