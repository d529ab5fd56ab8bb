"""GRPO step time and held-out accuracy: ours (in-process Megatron engine) vs TRL's `GRPOTrainer`.

One invocation runs both on the same tiny ERNIE 4.5 MoE (HF format), the same prompts in the same
order, the same group size, lengths, loss and optimizer, on CPU in fp32:

  ours  `python -m megatron_ernie.train recipe=grpo` in a child process (rollouts on the in-process
        Megatron engine, rl/megatron_engine.py); step time = time/batch_s + time/prepare_s +
        time/train_s + time/after_update_s of its metrics.jsonl (rollout + rewards, the old
        log-prob pass, the update, the refit of the engine)
  trl   TRL's `GRPOTrainer` in this process (transformers `generate`); step time = on_step_begin ->
        on_step_end of a TrainerCallback (generation + rewards + loss/backward + optimizer step).
        TRL's own timers only report to wandb/mlflow/trackio.
The first step (warm-up) is left out on both sides. Generation time: ours' rollout/generate_s,
TRL's `model.generate` calls (timed by a wrapper). tokens/s: generated tokens per second of step.

Held-out accuracy: both trained models are scored by the same CLI (`python -m megatron_ernie.rl.cli
--engine megatron --no-thinking`, greedy) on bundled:rl_math_eval.jsonl with the maths verifier;
TRL's model is saved with save_pretrained first. The starting model is scored too (for context).

Same on both sides: prompts per step, group size (num_generations = samples_per_prompt), max new
tokens, temperature 1.0 (top-p 1, top-k off), lr (constant, no warm-up), AdamW (betas 0.9/0.95,
eps 1e-8, weight decay 0.1), grad clip 1.0, one optimizer step per rollout batch, group advantages
over the group's std, clip 0.2/0.28, token-level loss (ours token-mean, TRL loss_type=dapo), no
KL / reference (β=0), no MoE aux loss, raw maths reward (no normalisation). Differences switched
off so that both optimise the same objective: our dynamic sampling, overlong penalty and truncated
importance sampling (TRL has none of them); TRL's gradient checkpointing (its default is on: off
here, like ours). Prompts: ours renders chat messages (`data.chat.prompt_ids`, non-thinking); TRL
gets exactly those rendered strings (checked to re-tokenize to the same ids), same tokenizer; the
prompt order is ours (`rl.rollout.PromptOrder`), fed to TRL unshuffled.

Model: hidden 256, 4 layers (1 dense + 3 MoE of 16 experts top-4, 2 shared), 8 query / 2 KV heads
of 64, vocab 512 (the bundled demo tokenizer), random weights then briefly SFT-ed by our trainer on
the bundled sft_demo + rl_sft data (`--sft-steps`, 0: random) and exported to HF; built once into
`--work` and reused by later runs (`--init DIR`: start from that HF dir instead).

    pip install 'megatron-ernie[bench]'    # TRL (benchmark only)
    python benchmarks/grpo_vs_trl.py [--steps 10] [--prompts-per-step 4] [--group 8] \
        [--max-new-tokens 64] [--lr 2e-5] [--init HF_DIR] [--work runs/bench_grpo_vs_trl]

Last line: ratio_step_time_ours_over_trl=<x> acc_ours=<a> acc_trl=<b>  (targets x <= 0.5, a >= b)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAIN_PROMPTS = "bundled:rl_math_train.jsonl"
EVAL_PROMPTS = "bundled:rl_math_eval.jsonl"
REWARDS = "sources:\n  math: {type: math}\nroutes:\n  - {domain: math, combine: {math: 1.0}}\n"
SEED = 1234
# optimizer and loss, both sides
BETAS, EPS, WEIGHT_DECAY, CLIP_GRAD = (0.9, 0.95), 1e-8, 0.1, 1.0
CLIP_LOW, CLIP_HIGH = 0.2, 0.28


def bench_args():
    from megatron_ernie.models.ernie import ErnieArgs

    return ErnieArgs(
        name="bench_grpo_moe", vocab_size=512, hidden_size=256, intermediate_size=1024, num_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
        num_experts=16, moe_k=4, moe_intermediate_size=256, moe_num_shared_experts=2,
        moe_layer_start_index=1, max_position_embeddings=4096,
    )


def _env() -> dict:
    from megatron_ernie.runtime.distributed import free_port

    env = dict(os.environ, MASTER_PORT=str(free_port()), PYTHONWARNINGS="ignore")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _run(cmd: list[str], log: Path, what: str) -> float:
    """A child process (its output to `log`); raises with the log's tail when it fails."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT).returncode
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"{what} failed (exit {rc}); the end of {log}:\n{tail}")
    return time.perf_counter() - t0


# --- the starting model ---------------------------------------------------------------------------
def random_hf_model(args, seed: int = 0, bias_std: float = 0.05):
    """A random transformers ERNIE MoE of `args`' shape (as tests/helpers.hf_model, without pytest):
    transformers 5 initialises the router to zeros, so the router and its correction bias get
    random values (otherwise every token picks the same experts)."""
    import torch
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    from megatron_ernie.models.ernie import to_hf_config

    cfg = {k: v for k, v in to_hf_config(args).items() if k not in ("model_type", "architectures")}
    torch.manual_seed(seed)
    model = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**cfg))
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                t.normal_(0.0, bias_std)
            elif name.endswith("mlp.gate.weight"):
                t.normal_(0.0, 0.1)
    return model.eval()


def build_init(work: Path, sft_steps: int) -> Path:
    """Random bench MoE + demo tokenizer (HF), then `sft_steps` of our SFT exported to HF; cached."""
    from megatron_ernie.data.tokenizer import demo_tokenizer

    random_dir = work / "init_random_hf"
    if not (random_dir / "config.json").exists():
        tmp = work / "init_random_hf.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        random_hf_model(bench_args(), seed=0).save_pretrained(str(tmp))
        demo_tokenizer().save_pretrained(str(tmp))
        tmp.rename(random_dir)
    if sft_steps <= 0:
        return random_dir
    out = work / f"init_sft{sft_steps}_hf"
    if (out / "config.json").exists():
        print(f"start: {out} (reused; delete it to rebuild)", flush=True)
        return out
    run_dir = work / f"sft{sft_steps}"
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"start: SFT of the random model, {sft_steps} steps (once; cached in {out}) ...", flush=True)
    seconds = _run([sys.executable, "-m", "megatron_ernie.train", "recipe=sft", f"model.init_from={random_dir}",
                    f"out_dir={run_dir}", "data.path='bundled:sft_demo.jsonl,bundled:rl_sft.jsonl'",
                    "data.seq_length=128", f"train.steps={sft_steps}", "train.global_batch_size=16",
                    "train.micro_batch_size=4", "optim.lr=3e-3", "optim.min_lr=3e-4",
                    f"optim.warmup_steps={max(sft_steps // 10, 1)}", "optim.weight_decay=0.01",
                    f"checkpoint.interval={sft_steps}", "checkpoint.resume=false"], work / "sft.log", "SFT")
    _run([sys.executable, "-c", "import sys; from megatron_ernie.conversion.cli import convert_main; "
          "sys.exit(convert_main())", "mcore-to-hf", "--mcore", str(run_dir), "--out", str(out), "--overwrite",
          "--no-progress"], work / "convert.log", "export to HF")
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"start: SFT done in {seconds:.0f} s", flush=True)
    return out


# --- shared inputs ----------------------------------------------------------------------------------
def rendered_prompts(init: Path, steps: int, per_step: int):
    """The prompts of each step in our order, with their rendered text; the longest prompt."""
    from transformers import AutoTokenizer

    from megatron_ernie.data.chat import prompt_ids
    from megatron_ernie.rl.rollout import PromptOrder, load_prompts

    tokenizer = AutoTokenizer.from_pretrained(str(init))
    prompts = load_prompts([TRAIN_PROMPTS])
    order = PromptOrder(len(prompts), SEED)
    rows, longest = [], 0
    for _ in range(steps):
        for i in order.take(per_step):
            p = prompts[i]
            ids = prompt_ids(p.messages, tokenizer, thinking=False)
            text = tokenizer.decode(ids)
            if tokenizer(text=text)["input_ids"] != ids:  # TRL tokenizes the string again
                raise SystemExit(f"prompt {i}: its rendered text does not re-tokenize to the same ids")
            longest = max(longest, len(ids))
            rows.append({"prompt": text, "question": p.text, "reference": p.reference, "domain": p.domain,
                         "task": p.task})
    return rows, longest


def held_out_accuracy(model: Path, work: Path, name: str, max_new_tokens: int) -> float:
    out = work / f"eval_{name}.json"
    _run([sys.executable, "-m", "megatron_ernie.rl.cli", "--model", str(model), "--prompts", EVAL_PROMPTS,
          "--rewards", str(work / "rewards.yaml"), "--no-thinking", "--max-new-tokens", str(max_new_tokens),
          "--engine", "megatron", "--out", str(out)], work / f"eval_{name}.log", f"evaluation of {name}")
    return float(json.loads(out.read_text())["metrics"]["eval/accuracy"])


# --- ours -------------------------------------------------------------------------------------------
def run_ours(a, init: Path, work: Path, seq_length: int) -> tuple[dict, Path]:
    out = work / "ours"
    shutil.rmtree(out, ignore_errors=True)
    n = a.steps + 1
    _run([sys.executable, "-m", "megatron_ernie.train", "recipe=grpo", f"model.init_from={init}",
          f"out_dir={out}", f"rl.rollout.prompts={TRAIN_PROMPTS}", f"rl.rewards={work / 'rewards.yaml'}",
          "rl.rollout.thinking=false", f"rl.rollout.prompts_per_step={a.prompts_per_step}",
          f"rl.rollout.samples_per_prompt={a.group}", f"rl.rollout.max_new_tokens={a.max_new_tokens}",
          "rl.rollout.temperature=1.0", "rl.rollout.top_p=1.0", "rl.rollout.top_k=0",
          f"data.seq_length={seq_length}", f"train.steps={n}", f"train.micro_batch_size={a.micro_batch}",
          f"train.seed={SEED}", f"optim.lr={a.lr}", f"optim.min_lr={a.lr}", "optim.warmup_steps=0",
          "optim.decay=constant", f"optim.weight_decay={WEIGHT_DECAY}", f"optim.clip_grad={CLIP_GRAD}",
          f"optim.beta1={BETAS[0]}", f"optim.beta2={BETAS[1]}", f"optim.eps={EPS}",
          f"rl.policy.clip_low={CLIP_LOW}", f"rl.policy.clip_high={CLIP_HIGH}", "rl.policy.aggregation=token-mean",
          "rl.policy.kl_coef=0.0", "rl.policy.tis_cap=null", "rl.policy.epochs=1", "rl.policy.mini_batches=1",
          "rl.grpo.normalize_std=true", "rl.grpo.dynamic_sampling=false", "rl.grpo.overlong_buffer=0",
          "model.moe_aux_loss_coeff=0.0", "model.moe_bias_update_rate=0.0",
          f"checkpoint.interval={n}", "checkpoint.resume=false"], work / "ours.log", "our GRPO run")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/batch_s" in r]
    steps = [sum(r[k] for k in ("time/batch_s", "time/prepare_s", "time/train_s", "time/after_update_s"))
             for r in rows]
    gen = [r["rollout/generate_s"] for r in rows]
    tokens = [r["rollout/response_len"] * a.prompts_per_step * a.group for r in rows]
    rewards = [r["rollout/reward_mean"] for r in rows]
    return _summary(steps, gen, tokens, rewards, a.prompts_per_step * a.group), out


# --- TRL --------------------------------------------------------------------------------------------
def run_trl(a, init: Path, work: Path, rows: list[dict]) -> tuple[dict, Path]:
    import torch
    import yaml
    from datasets import Dataset
    import datasets
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()

    from megatron_ernie.rewards.router import RewardRouter
    from megatron_ernie.rewards.types import RewardSample

    router = RewardRouter.from_config(yaml.safe_load((work / "rewards.yaml").read_text()))
    tokenizer = AutoTokenizer.from_pretrained(str(init))
    model = AutoModelForCausalLM.from_pretrained(str(init), dtype=torch.float32)
    timing = {"gen": 0.0, "tokens": 0, "reward": 0.0}

    generate = model.generate

    def timed_generate(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            timing["gen"] += time.perf_counter() - t0

    model.generate = timed_generate  # TRL generates with the (unwrapped) model itself on one CPU process

    def math_reward(prompts, completions, completion_ids, question, reference, domain, task, **_):
        samples = [RewardSample(prompt=q, response=c, domain=d, task=t, reference=r, group=str(i // a.group),
                                uid=str(i)) for i, (q, c, r, d, t) in
                   enumerate(zip(question, completions, reference, domain, task))]
        timing["tokens"] += sum(len(c) for c in completion_ids)
        rewards = [r.reward for r in router.score(samples)]
        timing["reward"] += sum(rewards) / len(rewards)
        return rewards

    steps, gen, tokens, rewards = [], [], [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            timing.update(gen=0.0, tokens=0, reward=0.0)
            timing["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append(time.perf_counter() - timing["t0"])
            gen.append(timing["gen"])
            tokens.append(timing["tokens"])
            rewards.append(timing["reward"])

    out = work / "trl"
    shutil.rmtree(out, ignore_errors=True)
    batch = a.prompts_per_step * a.group
    config = GRPOConfig(
        output_dir=str(out), use_cpu=True, bf16=False, fp16=False, seed=SEED, data_seed=SEED,
        max_steps=a.steps + 1, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, shuffle_dataset=False,  # one rollout batch per optimizer step
        num_generations=a.group, max_completion_length=a.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, weight_decay=WEIGHT_DECAY,
        max_grad_norm=CLIP_GRAD, beta=0.0, loss_type="dapo", epsilon=CLIP_LOW, epsilon_high=CLIP_HIGH,
        scale_rewards="group", mask_truncated_completions=False, router_aux_loss_coef=0.0,
        gradient_checkpointing=False,  # TRL's default is True; ours recomputes nothing either
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        log_completions=False,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=math_reward, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.remove_callback(PrinterCallback)  # its per-step log dicts
    trainer.train()
    final = work / "trl_hf"
    shutil.rmtree(final, ignore_errors=True)
    del model.generate
    trainer.model.save_pretrained(str(final))
    tokenizer.save_pretrained(str(final))
    return _summary(steps, gen, tokens, rewards, batch), final


# --- report -----------------------------------------------------------------------------------------
def _summary(steps, gen, tokens, rewards, completions: int) -> dict:
    """Means over the measured steps (the first, warm-up step left out)."""
    s, g, t, r = steps[1:], gen[1:], tokens[1:], rewards[1:]
    if not s:
        raise SystemExit("no measured step: --steps must be >= 1")
    return {"step_s": statistics.mean(s), "median_s": statistics.median(s), "gen_share": sum(g) / sum(s),
            "tokens_per_s": sum(t) / sum(s), "tokens_per_completion": sum(t) / (len(t) * completions), "reward": statistics.mean(r),
            "warmup_s": steps[0], "measured": len(s)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="measured steps (+1 warm-up step, left out)")
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--group", type=int, default=8, help="completions per prompt (num_generations)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="of training rollouts and of the evaluation")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--micro-batch", type=int, default=0,
                   help="our train.micro_batch_size (default: the whole step's completions, like TRL's batch)")
    p.add_argument("--init", type=Path, default=None, help="start from this HF model dir (with its tokenizer)")
    p.add_argument("--sft-steps", type=int, default=100, help="without --init: SFT steps of the random model (0: none)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_grpo_vs_trl")
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")  # TRL's and megatron-core's import-time chatter
    try:
        import trl
    except ImportError:
        print("error: TRL is not installed. It is a benchmark-only dependency: pip install 'megatron-ernie[bench]' "
              "(or pip install 'trl>=1.16,<2')", file=sys.stderr)
        return 2
    if min(a.steps, a.prompts_per_step, a.group, a.max_new_tokens) < 1:
        p.error("--steps, --prompts-per-step, --group and --max-new-tokens must be >= 1")
    a.micro_batch = a.micro_batch or a.prompts_per_step * a.group
    if (a.prompts_per_step * a.group) % a.micro_batch:
        p.error("--micro-batch must divide --prompts-per-step x --group")

    import torch
    import transformers

    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "rewards.yaml").write_text(REWARDS)
    init = a.init.resolve() if a.init else build_init(work, a.sft_steps)
    rows, longest = rendered_prompts(init, a.steps + 1, a.prompts_per_step)
    seq_length = longest + a.max_new_tokens  # our rows are padded to it: the least that fits
    c = json.loads((init / "config.json").read_text())
    print(f"model: {init} (hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, {c.get('moe_num_experts')} "
          f"experts top-{c.get('moe_k')}, {c.get('moe_num_shared_experts')} shared, head_dim {c.get('head_dim')}, "
          f"vocab {c['vocab_size']}); fp32 CPU, "
          f"threads {torch.get_num_threads()}; trl {trl.__version__}, transformers {transformers.__version__}")
    print(f"GRPO: {a.steps} measured steps (+1 warm-up) x {a.prompts_per_step} prompts x {a.group} completions, "
          f"<= {a.max_new_tokens} new tokens, lr {a.lr:g}; our micro-batch {a.micro_batch}, seq_length {seq_length}",
          flush=True)

    ours, ours_model = run_ours(a, init, work, seq_length)
    print(f"ours: {ours['step_s']:.3f} s/step", flush=True)
    theirs, trl_model = run_trl(a, init, work, rows)
    print(f"trl:  {theirs['step_s']:.3f} s/step", flush=True)
    acc_init = held_out_accuracy(init, work, "init", a.max_new_tokens)
    acc_ours = held_out_accuracy(ours_model, work, "ours", a.max_new_tokens)
    acc_trl = held_out_accuracy(trl_model, work, "trl", a.max_new_tokens)

    print(f"\nheld-out: {EVAL_PROMPTS} (greedy, same CLI for both); starting model accuracy {acc_init:.3f}")
    print(f"{'side':<5} {'step s (mean)':>13} {'median':>7} {'warm-up':>8} {'gen share':>9} {'tokens/s':>9} "
          f"{'tok/compl':>9} {'train reward':>12} {'accuracy':>8}")
    for name, s, acc in (("ours", ours, acc_ours), ("trl", theirs, acc_trl)):
        print(f"{name:<5} {s['step_s']:>13.3f} {s['median_s']:>7.3f} {s['warmup_s']:>8.2f} {s['gen_share']:>9.2f} "
              f"{s['tokens_per_s']:>9.1f} {s['tokens_per_completion']:>9.1f} {s['reward']:>12.3f} {acc:>8.3f}")
    print(f"ratio_step_time_ours_over_trl={ours['step_s'] / theirs['step_s']:.3f} acc_ours={acc_ours:.3f} "
          f"acc_trl={acc_trl:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
