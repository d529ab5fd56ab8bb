#!/bin/bash
#SBATCH --job-name=ernie45-300b-ppo
#SBATCH --nodes=48
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=72:00:00
#SBATCH --output=logs/%x-%j.out
# PPO with online UPO (recipe=ppo) of ERNIE-4.5-300B-A47B on 48 nodes x 8 H100 (384 GPUs, BF16).
# Layout: TP 8 (inside a node) x PP 6 (9 layers per stage) x EP 32 x ETP 1, sequence parallel,
# distributed optimizer; DP 8, expert DP 2.
# Why more than SFT's 12 nodes: PPO holds four copies of the model on every GPU: the actor and the
# critic (both trained: bf16 weights + fp32 grads + Adam state), the frozen reference and the
# rollout engine's model (refitted from the actor, plus its KV cache). The experts are ~96 % of
# the 300B (54 layers, 64 experts top-8, hidden 8192): at SFT's EP 8 a GPU holds 6.25B
# parameters, 37.5 GB of weights + grads per trained copy, so actor + critic alone exceed 80 GB.
# EP 32 (2 experts per GPU) cuts that to ~1.8B per GPU: ~11 GB per trained copy, ~3.5 GB per
# frozen one; Adam's 12 B/param over 384 ranks adds ~9.4 GB per trained copy: ~47 GB in all,
# leaving room for activations (seq 8192, micro-batch 2) and the KV cache. World size must be a
# multiple of TP x PP = 48 and of PP x EP = 192: 24 nodes would fit the layout but leave no room.
#   sbatch launchers/ppo_300b.sh model.init_from=runs/sft_300b rl.ppo.critic_init=runs/reward_model_300b \
#          rl.rollout.prompts=/data/rl_prompts.jsonl rl.rewards=recipes/rewards/ernie45_llm.yaml
# Every argument is passed through as a Hydra override (later ones win).
# Submit from the repository root: the job runs there and writes its log to logs/.
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
source launchers/common.sh
ernie_launch recipe=ppo model=ernie45_300b_a47b name=ppo_300b \
  parallel.tp=8 parallel.pp=6 parallel.ep=32 parallel.etp=1 parallel.sequence_parallel=true \
  parallel.distributed_optimizer=true model.dtype=bf16 \
  data.seq_length=8192 train.micro_batch_size=2 train.steps=1000 \
  rl.rollout.prompts_per_step=128 rl.rollout.samples_per_prompt=8 rl.rollout.max_new_tokens=6144 \
  rl.policy.mini_batches=2 rl.ppo.upo_coef=0.5 \
  optim.lr=1.0e-6 optim.min_lr=1.0e-6 checkpoint.interval=25 checkpoint.keep_last=2 \
  "$@"
