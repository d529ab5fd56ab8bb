"""The RL sbatch launchers on a real Slurm: slurmctld + two slurmd (node1, node2) on 127.0.0.1,
the job submitted from a fresh copy of the repository, one gloo process per node (CPU mode) in one
process group. Plus a cheap check (fake srun) that every RL launcher's overrides pass through and
compose, and that its layout fits its model and its nodes.

The Slurm tests need slurmctld/slurmd/sbatch (Debian: slurmctld slurmd slurm-client; .ci/run
installs them); as root with apt-get the fixture installs them itself, else they are skipped."""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_ernie.models.ernie import preset
from megatron_ernie.runtime import ParallelLayout
from megatron_ernie.training.config import compose

ROOT = Path(__file__).resolve().parents[1]
SBIN = os.pathsep.join(["/usr/sbin", "/sbin", "/usr/bin"])
PACKAGES = ["slurmctld", "slurmd", "slurm-client"]
HOSTS = Path("/etc/hosts")


# --- a real two-node Slurm on this machine ---------------------------------------------------------
def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN)


def _ensure_slurm() -> None:
    if all(_which(b) for b in ("slurmctld", "slurmd", "sbatch")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("needs Slurm (Debian: apt-get install slurmctld slurmd slurm-client, as root; "
                    ".ci/run does it): slurmctld not found, and not root with apt-get to install it")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        if r.returncode:
            pytest.skip(f"could not install Slurm ({' '.join(cmd)}): {r.stderr.strip()[-300:]}")


def _free_ports(count: int) -> int:
    """The first of `count` consecutive free TCP ports on 127.0.0.1."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + count > 65535:
            continue
        try:
            socks = []
            for p in range(first, first + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free consecutive ports")


def _resolves_locally(name: str) -> bool:
    try:
        return socket.gethostbyname(name) == "127.0.0.1"
    except OSError:
        return False


def _hosts_entry(tag: str):
    """Append `127.0.0.1 node1 node2` to /etc/hosts in place (it may be a bind mount) when the names
    do not resolve; return a function that removes exactly that line again."""
    if _resolves_locally("node1") and _resolves_locally("node2"):
        return lambda: None
    line = f"127.0.0.1 node1 node2  # {tag}\n"
    try:
        text = HOSTS.read_text()
        with HOSTS.open("a") as f:
            f.write(("" if text.endswith("\n") or not text else "\n") + line)
    except OSError as e:
        pytest.skip(f"node names node1/node2 must resolve and {HOSTS} is not writable: {e}")

    def remove():
        lines = HOSTS.read_text().splitlines(keepends=True)
        with HOSTS.open("r+") as f:  # rewrite in place: same inode
            f.write("".join(x for x in lines if x != line))
            f.truncate()
    return remove


def _slurm_conf(base: Path, ctld_port: int, slurmd_port: int, cpus: int) -> str:
    return f"""\
ClusterName=ernietest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
MailProg=/bin/true
EnforcePartLimits=ALL
MinJobAge=2
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool/%n
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd-%n.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd-%n.log
NodeName=node[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[{slurmd_port}-{slurmd_port + 1}] CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
"""


def _stop(pid_files: list[Path]) -> None:
    """SIGTERM the daemons of these pid files (only those), then SIGKILL what is left after 10 s."""
    pids = []
    for f in pid_files:
        try:
            pids.append(int(f.read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            pass

    def alive(pid):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in filter(alive, pids):
            os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while any(map(alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)


class Cluster:
    def __init__(self, base: Path, env: dict):
        self.base, self.env = base, env

    def run(self, *cmd, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([_which(cmd[0]) or cmd[0], *cmd[1:]], env=self.env, capture_output=True,
                              text=True, **{"timeout": 60, **kw})

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}:\n{p.read_text()[-3000:]}" for p in sorted(self.base.glob("*.log")))


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    _ensure_slurm()
    base = tmp_path_factory.mktemp("slurm")
    for d in ("state", "spool/node1", "spool/node2"):
        (base / d).mkdir(parents=True)
    conf = base / "slurm.conf"
    # the two emulated nodes split the host's CPUs (1 each on 2 cores): one process per node with
    # OMP_NUM_THREADS = its CPUs (the launcher's CPU mode) then does not oversubscribe the host
    conf.write_text(_slurm_conf(base, _free_ports(1), _free_ports(2), max(1, (os.cpu_count() or 2) // 2)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(SLURM_CONF=str(conf), PATH=f"{os.environ.get('PATH', '')}{os.pathsep}{SBIN}")
    remove_hosts = _hosts_entry(f"megatron-ernie test_slurm_launchers {os.getpid()}")
    cluster = Cluster(base, env)
    try:
        for cmd in (["slurmctld", "-f", str(conf)], ["slurmd", "-f", str(conf), "-N", "node1"],
                    ["slurmd", "-f", str(conf), "-N", "node2"]):
            r = cluster.run(*cmd)
            assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}\n{cluster.logs()}"
        deadline = time.monotonic() + 60
        while True:
            r = cluster.run("sinfo", "-h", "-N", "-o", "%N %t")
            states = dict(x.split() for x in r.stdout.splitlines() if x.strip())
            if states == {"node1": "idle", "node2": "idle"}:
                break
            assert time.monotonic() < deadline, f"nodes not idle: {r.stdout}{r.stderr}\n{cluster.logs()}"
            time.sleep(0.5)
        yield cluster
    finally:
        jobs = cluster.run("squeue", "-h", "-o", "%i").stdout.split()
        if jobs:
            cluster.run("scancel", *jobs)
            time.sleep(1)
        _stop([base / name for name in ("slurmd-node1.pid", "slurmd-node2.pid", "slurmctld.pid")])
        remove_hosts()


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """The repository as a fresh clone of the working tree has it: tracked and untracked files that
    git does not ignore (so no logs/*.out, runs/, caches)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    repo = tmp_path_factory.mktemp("checkout") / "megatron-ernie"
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():  # listed but deleted in the working tree: not in a clone either
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    assert not (repo / "logs").exists() or not any(p.suffix == ".out" for p in (repo / "logs").iterdir())
    prompts = repo.parent / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "domain": "general"}) + "\n"
                               for p in ("what is 2 + 3?", "spell cat", "say hello", "name a colour")))
    rewards = repo.parent / "rewards.yaml"  # a built-in source: a Slurm job is a fresh process
    rewards.write_text("sources:\n  r: {type: regex, pattern: '[aeiou]{2}'}\n"
                       "routes:\n  - {domain: '*', combine: {r: 1.0}}\n")
    return repo, prompts, rewards


def _tiny(prompts: Path, rewards: Path) -> list[str]:
    """CPU-sized overrides of the 300B PPO launcher: tiny MoE, EP 2 over the two nodes (DP 2)."""
    return ["model=ernie45_tiny_moe", "model.dtype=auto", "parallel.tp=1", "parallel.pp=1", "parallel.ep=2",
            "parallel.etp=1", "parallel.sequence_parallel=false", "data.seq_length=64",
            "train.micro_batch_size=2", "train.steps=2", "rl.rollout.prompts_per_step=2",
            "rl.rollout.samples_per_prompt=2", "rl.rollout.max_new_tokens=8", "rl.policy.mini_batches=1",
            f"rl.rollout.prompts={prompts}", f"rl.rewards={rewards}", "checkpoint.interval=2"]


def _sbatch(cluster: Cluster, repo: Path, script: str, overrides: list[str]):
    """`sbatch --wait` from the checkout's root as a user would, on both nodes, no GPUs: the
    script's own #SBATCH lines otherwise (its --output among them)."""
    env = dict(cluster.env, PYTHON=sys.executable, MASTER_PORT=str(_free_ports(1)))
    env.pop("OMP_NUM_THREADS", None)
    if shutil.which("nvidia-smi"):
        env["ERNIE_GPUS_PER_NODE"] = "0"
    cmd = [_which("sbatch"), "--wait", "--nodes=2", "--gpus-per-node=0", "--time=5", script, *overrides]
    t = time.monotonic()
    r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=240)
    m = re.search(r"Submitted batch job (\d+)", r.stdout)
    assert m, f"{r.stdout}{r.stderr}\n{cluster.logs()}"
    outs = list((repo / "logs").glob(f"*-{m.group(1)}.out"))
    return r, (outs[0].read_text() if outs else None), time.monotonic() - t


def test_ppo_launcher_runs_on_two_slurm_nodes(slurm, checkout):
    repo, prompts, rewards = checkout
    r, log, _ = _sbatch(slurm, repo, "launchers/ppo_300b.sh", [*_tiny(prompts, rewards), "out_dir=runs/slurm_ppo"])
    assert log is not None, f"no job output file in logs/ (exit {r.returncode})\n{slurm.logs()}"
    assert r.returncode == 0, log
    assert "2 nodes x CPU mode: 1 gloo process, OMP_NUM_THREADS=" in log
    assert "node node1 SLURM_NODEID=0 starts 1 process(es)" in log
    assert "node node2 SLURM_NODEID=1 starts 1 process(es)" in log
    assert "[ppo_300b] ernie45_tiny_moe tp=1 pp=1 ep=2 dp=2;" in log  # one process group of world 2
    rows = [json.loads(x) for x in (repo / "runs/slurm_ppo/metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(math.isfinite(row["loss"]) and math.isfinite(row["critic/loss"]) for row in rows)


def test_bad_override_fails_the_job_with_one_line(slurm, checkout):
    repo, prompts, rewards = checkout
    r, log, _ = _sbatch(slurm, repo, "launchers/ppo_300b.sh", [*_tiny(prompts, rewards), "train.stepz=3"])
    assert log is not None, f"no job output file in logs/ (exit {r.returncode})\n{slurm.logs()}"
    assert r.returncode == 2, log  # the job's exit code: the config check's, on the batch host
    errors = [x for x in log.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "train.stepz" in errors[0], log
    assert "Traceback" not in log and "starts 1 process" not in log, log  # no rank was started


# --- cheap: overrides pass through and compose (srun/scontrol stand-ins) ----------------------------
def _fake_slurm(bin_dir: Path, log: Path) -> None:
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && printf "gpu-a17\\ngpu-a18\\n"\n')
    (bin_dir / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {log}\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)


@pytest.mark.parametrize("script, recipe, stage, user", [
    ("ppo_300b.sh", "ppo", "ppo", ["rl.rollout.prompts=/data/my prompts.jsonl", "rl.rollout.max_new_tokens=2048"]),
    ("grpo_21b.sh", "grpo", "grpo", ["rl.rollout.prompts=/data/my prompts.jsonl", "rl.rollout.max_new_tokens=2048"]),
    ("upo_300b.sh", "upo_offline", "upo_offline", ["data.path=/data/my pairs.jsonl", "train.steps=7"]),
])
def test_rl_launchers_pass_overrides_that_compose_and_fit(tmp_path, script, recipe, stage, user):
    if not (ROOT / "recipes" / "recipe" / f"{recipe}.yaml").exists():
        pytest.skip(f"recipes/recipe/{recipe}.yaml does not exist (yet)")
    log = tmp_path / "srun.args"
    _fake_slurm(tmp_path / "bin", log)
    text = (ROOT / "launchers" / script).read_text()
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
    gpus = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", text).group(1))
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-a[17-18]",
               SLURM_NNODES=str(nodes), SLURM_GPUS_ON_NODE=str(gpus), SLURM_SUBMIT_DIR=str(ROOT))
    out = subprocess.run(["bash", str(ROOT / "launchers" / script), *user], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    cmd = shlex.split(log.read_text().splitlines()[-1])
    assert f"--nnodes={nodes}" in cmd and f"--nproc-per-node={gpus}" in cmd
    overrides = cmd[cmd.index("megatron_ernie.train") + 1:]
    assert overrides[0] == f"recipe={recipe}"
    assert overrides[-len(user):] == user  # the user's come last (they win), spaces kept
    cfg = compose(overrides)
    if stage:
        assert cfg.stage.value == stage
    for o in user:
        key, value = o.split("=", 1)
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert str(node) == value, key
    p = cfg.parallel
    layout = ParallelLayout(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, sequence_parallel=bool(p.sequence_parallel),
                            distributed_optimizer=p.distributed_optimizer)
    world = nodes * gpus
    layout.validate(preset(cfg.model.preset), world_size=world)
    assert p.distributed_optimizer and cfg.model.dtype.value == "bf16"
    dp = layout.data_parallel_size(world)
    if stage in ("ppo", "grpo"):
        r = cfg.rl.rollout
        assert r.prompts_per_step % (dp * cfg.rl.policy.mini_batches) == 0
        rows = r.prompts_per_step // (dp * cfg.rl.policy.mini_batches) * r.samples_per_prompt
        assert rows % cfg.train.micro_batch_size == 0
        if stage == "ppo":  # online UPO pairs (best, worst) inside a micro-batch
            assert cfg.train.micro_batch_size % 2 == 0 and r.samples_per_prompt % 2 == 0
    else:
        assert cfg.train.global_batch_size % (cfg.train.micro_batch_size * dp) == 0
