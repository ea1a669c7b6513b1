#!/usr/bin/env python3
"""A real one-node Slurm cluster on 127.0.0.1 for the tests, benchmarks and demos.

``start`` writes its own munge key and slurm.conf into a state directory, starts
munged, slurmctld and slurmd (Debian's slurm-wlm and munge) on free ports and waits
until the node is idle; ``stop`` cancels its jobs and ends only what it started.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# The process helpers are the local Swift's (same directory, same house rules).
from local_swift import (
    StartError,
    all_alive,
    free_port,
    load_json,
    spawn,
    stop_pids,
    wait_for,
    write_private,
)

REPO = Path(__file__).resolve().parent.parent
CLUSTER = "hbplocal"
PARTITION = "local"
NODE = "localnode"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")
START_TIMEOUT = 60.0

EPILOG = """\
examples:
  scripts/local-slurm start              # prints the env JSON when the node is idle
  export SLURM_CONF=$(scripts/local-slurm env --field slurm_conf)
  sbatch --wait --wrap 'hostname'        # runs on the local node
  scripts/local-slurm stop               # cancels its jobs, stops its daemons

environment:
  LOCAL_SLURM_DIR   state directory (default: <repo>/.local-slurm)

The cluster needs Debian's packages: apt-get install slurm-wlm munge. It runs
as root (SlurmUser=root), tracks processes with proctrack/linuxproc (no cgroups),
has no accounting (so no sacct: use squeue and scontrol) and allocates cores and
memory (select/cons_tres, CR_Core_Memory): a job asking for more memory than the
node has stays pending.
"""


def state_dir(option: str | None) -> Path:
    """Returns the state directory: the option, else $LOCAL_SLURM_DIR, else the repo's."""
    value = option or os.environ.get("LOCAL_SLURM_DIR") or str(REPO / ".local-slurm")
    return Path(value).resolve()


def missing_binaries() -> list[str]:
    """Returns the daemons and commands of slurm-wlm and munge that are not on PATH."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [name for name in BINARIES if not shutil.which(name, path=path)]


def binary(name: str) -> str:
    """Returns the full path of a daemon or command (daemons live in /usr/sbin)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = shutil.which(name, path=path)
    if not found:
        raise StartError(f"{name} not found: apt-get install slurm-wlm munge")
    return found


def node_resources(cpus: int | None, memory_mb: int | None) -> tuple[int, int]:
    """Returns the node's CPUs and memory in MiB: the options, else this machine's."""
    cpus = cpus or os.cpu_count() or 1
    if not memory_mb:
        with open("/proc/meminfo") as handle:
            total_kib = next(int(line.split()[1]) for line in handle if line.startswith("MemTotal"))
        memory_mb = total_kib // 1024
    return cpus, memory_mb


def slurm_conf_text(state: Path, ports: dict, cpus: int, memory_mb: int) -> str:
    """Returns slurm.conf: one node, one partition, everything under the state dir."""
    return f"""# Written by scripts/local-slurm; rewritten at every start.
ClusterName={CLUSTER}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ports["slurmctld"]}
SlurmdPort={ports["slurmd"]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={state / "munge" / "munge.socket"}
CredType=cred/munge
StateSaveLocation={state / "slurmctld"}
SlurmdSpoolDir={state / "slurmd"}
SlurmctldPidFile={state / "run" / "slurmctld.pid"}
SlurmdPidFile={state / "run" / "slurmd.pid"}
SlurmctldLogFile={state / "logs" / "slurmctld.log"}
SlurmdLogFile={state / "logs" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
# Jobs are not bound to their cores (task/affinity would): the servers the tests
# start (Swift, Keystone) share this node's cores, and a bound job cannot move off
# a core they load (bench_array: 2 tasks 1.16-1.29x the single ingest bound, 1.16-1.20x not).
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# A pass over the pending jobs every 0.1 s (default: 2 s), so that the next array
# task or a dependent job starts as soon as a core is free, as on a busy cluster;
# batch_sched_delay=0 (default: 3 s) lets slurmctld's once-a-second loop start a
# submitted array or a job whose dependency just ended at its next tick, not up
# to 3 s later.
SchedulerParameters=sched_min_interval=100000,batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU={max(1, memory_mb // cpus)}
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
# Finished jobs stay visible to scontrol for 10 minutes (there is no accounting).
MinJobAge=600
KillWait=10
NodeName={NODE} NodeHostname=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} \
State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""


def client_env(env: dict) -> dict:
    """Returns os.environ with this cluster's SLURM_CONF, for the Slurm commands."""
    return {**os.environ, "SLURM_CONF": env["slurm_conf"]}


def node_state(env: dict) -> str:
    """Returns the node's state as sinfo-like text from scontrol ('' when unreachable)."""
    result = subprocess.run(
        [binary("scontrol"), "show", "node", NODE, "-o"],
        capture_output=True,
        text=True,
        env=client_env(env),
        timeout=10,
    )
    for field in result.stdout.split():
        if field.startswith("State="):
            return field.split("=", 1)[1]
    return ""


def healthy(env: dict) -> bool:
    """Returns True when slurmctld answers and the node takes jobs (idle, mixed or allocated)."""
    state = node_state(env)
    return state.split("+")[0] in ("IDLE", "MIXED", "ALLOCATED")


def current_env(state: Path) -> dict:
    """Returns the recorded env of a started cluster ({} when none)."""
    return load_json(state / "env.json")


def start_munged(state: Path) -> int:
    """Writes a fresh munge key and starts munged on a socket in the state dir."""
    munge = state / "munge"
    munge.mkdir(mode=0o755, exist_ok=True)
    key = munge / "munge.key"
    if key.exists():
        key.chmod(0o600)
    write_private(key, os.urandom(1024).hex(), mode=0o400)
    argv = [
        binary("munged"),
        "--foreground",
        "--force",
        f"--socket={munge / 'munge.socket'}",
        f"--key-file={key}",
        f"--log-file={state / 'logs' / 'munged.log'}",
        f"--pid-file={state / 'run' / 'munged.pid'}",
        f"--seed-file={munge / 'munged.seed'}",
    ]
    pid = spawn(state, "munged", argv)
    wait_for("munged", lambda: (munge / "munge.socket").exists(), [state / "logs" / "munged.log"])
    return pid


def start(state: Path, args: argparse.Namespace) -> dict:
    """Starts munged, slurmctld and slurmd (or finds them running); returns the env."""
    env = current_env(state)
    if env and all_alive(env) and healthy(env):
        return env
    if env:
        stop(state)
    missing = missing_binaries()
    if missing:
        raise StartError(
            f"{', '.join(missing)} not installed: apt-get install slurm-wlm munge "
            "(Debian's packages)"
        )
    started = time.time()
    for sub in ("logs", "run", "munge", "slurmctld", "slurmd"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    cpus, memory_mb = node_resources(args.cpus, args.memory)
    ports = {"slurmctld": free_port(), "slurmd": free_port()}
    while ports["slurmd"] == ports["slurmctld"]:
        ports["slurmd"] = free_port()
    conf = state / "slurm.conf"
    write_private(conf, slurm_conf_text(state, ports, cpus, memory_mb), mode=0o644)
    env = {
        "slurm_conf": str(conf),
        "cluster": CLUSTER,
        "partition": PARTITION,
        "node": NODE,
        "cpus": cpus,
        "memory_mb": memory_mb,
        "slurmctld_port": ports["slurmctld"],
        "slurmd_port": ports["slurmd"],
        "logs_dir": str(state / "logs"),
        "state_dir": str(state),
        "pids": {},
    }
    pids = env["pids"]
    daemon_env = {"SLURM_CONF": str(conf)}
    try:
        pids["munged"] = start_munged(state)
        # -c: a fresh cluster, no jobs recovered from an earlier start.
        pids["slurmctld"] = spawn(
            state, "slurmctld", [binary("slurmctld"), "-D", "-c", "-f", str(conf)], daemon_env
        )
        pids["slurmd"] = spawn(
            state, "slurmd", [binary("slurmd"), "-D", "-f", str(conf), "-N", NODE], daemon_env
        )
        write_private(state / "env.json", json.dumps(env, indent=2))
        logs = [state / "logs" / f"{n}.log" for n in ("slurmctld", "slurmd", "munged")]
        wait_for("the Slurm node", lambda: healthy(env), logs, timeout=START_TIMEOUT)
        for name, pid in pids.items():
            if not all_alive({"pids": {name: pid}}):
                raise StartError(f"{name} exited; see {state / 'logs' / (name + '.log')}")
    except BaseException:
        stop(state)
        raise
    print(f"local-slurm: started in {time.time() - started:.1f} s", file=sys.stderr)
    return env


def cancel_jobs(env: dict) -> None:
    """Cancels every job of the cluster and waits (briefly) until none is left."""
    if not (env.get("pids") or {}).get("slurmctld") or not all_alive(env):
        return
    try:
        subprocess.run(
            [binary("scancel"), "--full", "--user=root"],
            capture_output=True,
            env=client_env(env),
            timeout=10,
        )
        deadline = time.time() + 15
        while time.time() < deadline:
            queue = subprocess.run(
                [binary("squeue"), "-h", "-o", "%i", "-t", "PD,R,CG,S"],
                capture_output=True,
                text=True,
                env=client_env(env),
                timeout=10,
            )
            if queue.returncode != 0 or not queue.stdout.strip():
                return
            time.sleep(0.5)
    except (OSError, subprocess.SubprocessError, StartError):
        pass


def stop(state: Path) -> bool:
    """Cancels the cluster's jobs and stops its daemons; returns True if any was recorded."""
    env = current_env(state)
    pids = env.get("pids") or {}
    cancel_jobs(env)
    # slurmd first, munged last: the others authenticate through it while stopping.
    order = [name for name in ("slurmd", "slurmctld", "munged") if name in pids]
    for name in order:
        stop_pids({name: pids[name]})
    if (state / "env.json").exists():
        (state / "env.json").unlink()
    return bool(pids)


def parse_command_line(argv: list | None) -> argparse.Namespace:
    """Returns the parsed command line."""
    parser = argparse.ArgumentParser(
        prog="local-slurm",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "command",
        choices=["start", "stop", "status", "env"],
        help="start: start (idempotent) and print the env JSON; stop: cancel the "
        "jobs and stop what start started; status: exit 0 when the node takes jobs; "
        "env: print the env JSON",
    )
    parser.add_argument(
        "--dir",
        default=None,
        help="state directory (default: $LOCAL_SLURM_DIR or <repo>/.local-slurm)",
    )
    parser.add_argument(
        "--cpus",
        type=int,
        default=None,
        metavar="N",
        help="the node's CPUs (default: this machine's)",
    )
    parser.add_argument(
        "--memory",
        type=int,
        default=None,
        metavar="MIB",
        help="the node's memory in MiB (default: this machine's)",
    )
    parser.add_argument(
        "--field", default=None, metavar="NAME", help="env: print only this field of the JSON"
    )
    return parser.parse_args(argv)


def main(argv: list | None = None) -> int:
    """Runs one command; returns the exit code."""
    args = parse_command_line(argv)
    state = state_dir(args.dir)
    if args.command in ("start", "stop"):
        # Concurrent starts and stops of one state dir take turns.
        import fcntl

        state.mkdir(parents=True, exist_ok=True)
        lock = open(state / ".lock", "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        if args.command == "start":
            env = start(state, args)
            print(json.dumps(env, indent=2))
            return 0
        if args.command == "stop":
            if not stop(state):
                print(f"local-slurm: nothing recorded as running in {state}", file=sys.stderr)
            return 0
        env = current_env(state)
        running = bool(env) and all_alive(env) and healthy(env)
        if args.command == "status":
            print(f"local-slurm: {'running' if running else 'not running'} (state {state})")
            return 0 if running else 1
        if not running:
            print(
                f"local-slurm: not running (state {state}); run: scripts/local-slurm start",
                file=sys.stderr,
            )
            return 1
        print(env[args.field] if args.field else json.dumps(env, indent=2))
        return 0
    except (StartError, subprocess.SubprocessError, OSError) as exc:
        print(f"local-slurm: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
