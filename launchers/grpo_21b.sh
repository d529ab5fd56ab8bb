#!/bin/bash
#SBATCH --job-name=ernie45-21b-grpo
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
# GRPO with DAPO (recipe=grpo) of ERNIE-4.5-21B-A3B on 4 nodes x 8 H100 (32 GPUs, BF16).
# Layout: TP 2 x PP 1 x EP 8 x ETP 1, sequence parallel, distributed optimizer; DP 16, expert DP 4.
# Why: 28 layers, 64 experts top-6, hidden 2560, 20 heads / 4 KV heads (TP must divide 4). The
# experts (~20B of the 21.8B) shard over EP 8 inside a node, the dense part over TP 2: ~3.3B
# parameters per GPU, ~20 GB of bf16 weights + fp32 grads, ~8 GB of Adam state over 32 ranks,
# ~6.5 GB for the rollout engine's copy (no critic; no reference while rl.policy.kl_coef=0).
# Memory would fit on 2 nodes; RL time is rollout time, so 4 nodes double the generating ranks.
#   sbatch launchers/grpo_21b.sh model.init_from=/ckpt/ERNIE-4.5-21B-A3B-PT \
#          rl.rollout.prompts=/data/rl_prompts.jsonl rl.rewards=recipes/rewards/ernie45_llm.yaml
# Every argument is passed through as a Hydra override (later ones win).
# Submit from the repository root: the job runs there and writes its log to logs/.
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
source launchers/common.sh
ernie_launch recipe=grpo model=ernie45_21b_a3b name=grpo_21b \
  parallel.tp=2 parallel.pp=1 parallel.ep=8 parallel.etp=1 parallel.sequence_parallel=true \
  parallel.distributed_optimizer=true model.dtype=bf16 \
  data.seq_length=8192 train.micro_batch_size=4 train.steps=1000 \
  rl.rollout.prompts_per_step=128 rl.rollout.samples_per_prompt=16 rl.rollout.max_new_tokens=6144 \
  rl.policy.mini_batches=2 rl.grpo.overlong_buffer=1024 \
  optim.lr=1.0e-6 optim.min_lr=1.0e-6 checkpoint.interval=25 checkpoint.keep_last=2 \
  "$@"
