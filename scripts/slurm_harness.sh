#!/usr/bin/env bash
# Runs examples/slurm_llama3_8b.sbatch for real on this one host: a private Slurm cluster (munged,
# slurmctld and two slurmd, nodes n1 and n2, both on 127.0.0.1 with their own ports), a tiny CPU
# config, `sbatch` on 2 nodes x 1 rank, `scontrol requeue` once the first checkpoint exists, and the
# requeued job running to the end. Passes when the requeued attempt says "resumed from ... at step N"
# and every step's loss and gradient norm (the last record per step in metrics.jsonl) equal an
# uninterrupted run of the same config (torchrun --standalone, 2 ranks) to 1e-6. Prints a report;
# stops what it started. docs/scale-out.md ("SLURM, run for real") has a run's output.
#
#   sudo scripts/slurm_harness.sh            # as root; a few minutes on 2 CPU cores
#
# Needs: Debian/Ubuntu (installs slurm-wlm and munge with apt-get when missing), the project's venv
# (PYTHON, default .venv/bin/python). Environment: WORK (default /tmp/anchored-slurm, wiped at start;
# must be under /tmp), SLURM_HARNESS_PORT (slurmctld's port, default 16817; the slurmd take the next
# two). Two slurmd on one host need a Slurm built with --enable-multiple-slurmd; Debian's is.
# Nothing here touches /etc/slurm or the system's munged: the cluster has its own slurm.conf (via
# SLURM_CONF), munge key and socket under WORK.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-/tmp/anchored-slurm}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
PORT=${SLURM_HARNESS_PORT:-16817}
TOL=1e-6
STARTED=$(date +%s)

die() { echo "slurm_harness: FAIL: $*" >&2; exit 1; }
say() { echo "[$(( $(date +%s) - STARTED ))s] $*"; }

[[ $EUID == 0 ]] || die "run as root (it installs packages and starts munged, slurmctld and slurmd)"
[[ $WORK == /tmp/?* && $WORK != *..* ]] || die "WORK must be a directory under /tmp (it is wiped at start), got $WORK"
[[ -x $PYTHON ]] || die "PYTHON=$PYTHON: not an executable (make setup creates .venv)"
VENV_BIN=$(dirname "$PYTHON")
[[ -x $VENV_BIN/torchrun && -x $VENV_BIN/anchored-sft ]] || die "$VENV_BIN has no torchrun / anchored-sft (pip install -e . into that venv)"

# ---- packages ------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  say "installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null; } \
    || die "apt-get install slurm-wlm munge failed"
fi
say "$(slurmctld -V), $(munged -V 2>&1 | head -n 1)"

# ---- a fresh private cluster ---------------------------------------------------------------
# A previous run's daemons (killed harness, no trap): cancel its jobs (their slurmstepd outlive
# slurmd), then stop the daemons by their pid files, each only while it is still the process this
# harness started (its command line names WORK).
if [[ -d $WORK/pids ]]; then
  if [[ -e $WORK/slurm.conf ]] && old_jobs=$(SLURM_CONF=$WORK/slurm.conf squeue -h -o %A 2>/dev/null) && [[ -n $old_jobs ]]; then
    # shellcheck disable=SC2086  # one argument per job id
    SLURM_CONF=$WORK/slurm.conf scancel $old_jobs || true
    for _ in $(seq 1 30); do [[ -z $(SLURM_CONF=$WORK/slurm.conf squeue -h -o %A 2>/dev/null) ]] && break; sleep 1; done
  fi
  for pidfile in "$WORK"/pids/*.pid; do
    [[ -e $pidfile ]] || continue
    pid=$(cat "$pidfile")
    if [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "$WORK"; then
      kill "$pid" 2>/dev/null || true
    fi
  done
  sleep 2
fi
rm -rf "$WORK"
mkdir -p "$WORK"/{pids,log,state,spool/n1,spool/n2,munge}
chmod 755 "$WORK" "$WORK/munge"  # munged checks that its socket's directories are reachable by all
install -d -m 700 "$WORK/munge/etc"
head -c 1024 /dev/urandom > "$WORK/munge/etc/munge.key"
chmod 400 "$WORK/munge/etc/munge.key"
MUNGE_SOCKET=$WORK/munge/munge.socket
export SLURM_CONF=$WORK/slurm.conf

cat > "$SLURM_CONF" <<EOF
ClusterName=anchored-harness
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool/%n
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd-%n.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd-%n.log
# No cgroups: process tracking by /proc, no task binding (both nodes share this host's cores).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
MailProg=/bin/true
# Two node names on this host: same address, a port each (a multiple-slurmd build).
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT + 1)) CPUs=1 RealMemory=2000 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT + 2)) CPUs=1 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF

JOB=""
cleanup() {
  local rc=$?
  set +e
  if [[ -n $JOB ]] && squeue -h -j "$JOB" 2>/dev/null | grep -q .; then
    scancel "$JOB"
    for _ in $(seq 1 20); do squeue -h -j "$JOB" 2>/dev/null | grep -q . || break; sleep 1; done
  fi
  for name in slurmd-n1 slurmd-n2 slurmctld munged; do
    [[ -e $WORK/pids/$name.pid ]] && kill "$(cat "$WORK/pids/$name.pid")" 2>/dev/null
  done
  wait 2>/dev/null
  [[ $rc == 0 ]] || echo "slurm_harness: logs under $WORK/log and $WORK/*.out" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

munged -F --socket="$MUNGE_SOCKET" --key-file="$WORK/munge/etc/munge.key" --pid-file="$WORK/munge/munged.pid" \
  --seed-file="$WORK/munge/etc/munged.seed" --log-file="$WORK/log/munged.log" > "$WORK/log/munged.out" 2>&1 &
echo $! > "$WORK/pids/munged.pid"
for _ in $(seq 1 50); do [[ -S $MUNGE_SOCKET ]] && break; sleep 0.2; done
munge --socket="$MUNGE_SOCKET" -n | unmunge --socket="$MUNGE_SOCKET" >/dev/null || die "munged did not start ($WORK/log/munged.out)"

slurmctld -D -f "$SLURM_CONF" > "$WORK/log/slurmctld.out" 2>&1 &
echo $! > "$WORK/pids/slurmctld.pid"
for node in n1 n2; do
  slurmd -D -f "$SLURM_CONF" -N "$node" > "$WORK/log/slurmd-$node.out" 2>&1 &
  echo $! > "$WORK/pids/slurmd-$node.pid"
done
for _ in $(seq 1 60); do
  [[ $(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l) == 2 ]] && break
  sleep 0.5
done
[[ $(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l) == 2 ]] \
  || die "the two nodes did not come up idle: $(sinfo -N 2>&1 | tr '\n' ' '); see $WORK/log"
say "cluster up: $(sinfo -h -N -o '%N:%T' | sort -u | tr '\n' ' ')"

# ---- a tiny run: SFT records, a tokenizer, base and teacher weights ------------------------
# Everything below, the job included (sbatch passes this environment on), imports this checkout.
export PATH=$VENV_BIN:$PATH PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NO_VCS_VERSION=1 OMP_NUM_THREADS=1
cd "$REPO"
"$PYTHON" - "$WORK" <<'EOF'
import json, os, random, sys

work = sys.argv[1]
words = "alpha beta gamma delta red blue green one two three four five six seven eight nine ten plus minus equals".split()
rng = random.Random(0)
with open(os.path.join(work, "corpus.txt"), "w") as fh:
    fh.write("\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(400)) + "\nUser: Assistant: System: ? 0 1 2 3\n")
with open(os.path.join(work, "sft.jsonl"), "w") as fh:
    for _ in range(128):
        fh.write(json.dumps({"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(2, 5))),
                             "response": " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))}) + "\n")
EOF
"$PYTHON" -m anchored_megatron.data.train_tokenizer --input "$WORK/corpus.txt" --vocab-size 120 --output "$WORK/tok" \
  > "$WORK/prepare.out" 2>&1 || die "training the tokenizer failed: $WORK/prepare.out"
# Base and teacher through the trainer itself (one process, random init, plain SFT): the base is
# its step-4 checkpoint, the teacher its step-16 one, far enough apart that the anchored loss is not ~0.
cat > "$WORK/base.yaml" <<EOF
output_dir: $WORK/out_base
seed: 11
model: {preset: tiny}
data: {paths: [$WORK/sft.jsonl], tokenizer: $WORK/tok, cache_dir: $WORK/cache}
anchor: {objective: sft, outer_iterations: 1, epochs_per_iteration: 1}
optim: {lr: 0.003, warmup_fraction: 0.1}
train: {micro_batch_size: 1, global_batch_size: 4, save_interval: 4, keep_checkpoints: 4, max_steps: 16, progress_bar: false, tensorboard: false}
EOF
"$PYTHON" -m anchored_megatron.train --config "$WORK/base.yaml" >> "$WORK/prepare.out" 2>&1 \
  || die "training the base and teacher failed: $WORK/prepare.out"
CONFIG=$WORK/tiny.yaml
cat > "$CONFIG" <<EOF
seed: 3
student: {checkpoint: $WORK/out_base/checkpoints/iter_0000004}
reference: {checkpoint: $WORK/out_base/checkpoints/iter_0000016}
data: {paths: [$WORK/sft.jsonl], tokenizer: $WORK/tok, cache_dir: $WORK/cache}
anchor: {objective: anchored, alpha: 0.5, outer_iterations: 2, epochs_per_iteration: 2}
optim: {lr: 0.003, warmup_fraction: 0.1, clip_grad: 1.0}
train: {micro_batch_size: 1, global_batch_size: 4, save_interval: 8, progress_bar: false, tensorboard: false}
EOF
say "data, tokenizer, base and teacher in $WORK"

# ---- the reference: the same config, uninterrupted, one torchrun with 2 ranks --------------
t0=$(date +%s)
torchrun --standalone --nproc_per_node 2 -m anchored_megatron.train --config "$CONFIG" output_dir="$WORK/out_direct" \
  > "$WORK/direct.out" 2>&1 || die "the uninterrupted run failed: $WORK/direct.out"
DIRECT_S=$(( $(date +%s) - t0 ))
say "uninterrupted run (torchrun --standalone, 2 ranks): ${DIRECT_S}s, $(tail -n 1 "$WORK/out_direct/train.log")"

# ---- the SLURM job: 2 nodes x 1 rank, requeued once mid-run -------------------------------
job_state() { scontrol show job "$JOB" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'; }
SUBMIT=(sbatch --parsable --nodes=2 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1 --requeue
        --job-name=anchored-harness --output="$WORK/slurm-%j.out" --chdir="$REPO"
        examples/slurm_llama3_8b.sbatch output_dir="$WORK/out_slurm")
say "CONFIG=$CONFIG GPUS_PER_NODE=1 ${SUBMIT[*]}"
t0=$(date +%s)
JOB=$(CONFIG=$CONFIG GPUS_PER_NODE=1 "${SUBMIT[@]}")
LATEST=$WORK/out_slurm/checkpoints/latest
for _ in $(seq 1 900); do
  [[ -s $LATEST ]] && break
  case $(job_state) in PENDING|CONFIGURING|RUNNING|"") ;; *) die "job $JOB ended ($(job_state)) before its first checkpoint: $WORK/slurm-$JOB.out" ;; esac
  sleep 0.2
done
[[ -s $LATEST ]] || die "no checkpoint from job $JOB after 180 s: $WORK/slurm-$JOB.out"
FIRST_CKPT=$(cat "$LATEST")
# Mid-run: a step or two past the checkpoint, so that the requeued attempt has steps to run again.
METRICS=$WORK/out_slurm/metrics.jsonl
last_step() { tail -n 1 "$METRICS" 2>/dev/null | sed -n 's/^{"step": \([0-9]*\),.*/\1/p'; }
for _ in $(seq 1 300); do
  step=$(last_step)
  (( ${step:-0} >= 10#${FIRST_CKPT#iter_} + 2 )) && break
  [[ $(job_state) == RUNNING ]] || die "job $JOB is $(job_state) right after its first checkpoint: $WORK/slurm-$JOB.out"
  sleep 0.1
done
scontrol requeue "$JOB"
say "job $JOB on $(squeue -h -j "$JOB" -o %N): first checkpoint $FIRST_CKPT after $(( $(date +%s) - t0 ))s; at step $(last_step): scontrol requeue $JOB"
# A requeued job waits about two minutes (its BeginTime) before it may start again; move it to now.
for _ in $(seq 1 150); do [[ $(job_state) == PENDING ]] && break; sleep 0.2; done
[[ $(job_state) == PENDING ]] || die "job $JOB is $(job_state) after the requeue, expected PENDING"
scontrol update JobId="$JOB" StartTime=now
for _ in $(seq 1 1500); do
  case $(job_state) in PENDING|CONFIGURING|RUNNING|COMPLETING|REQUEUED) sleep 0.2 ;; *) break ;; esac
done
STATE=$(job_state)
SLURM_S=$(( $(date +%s) - t0 ))
[[ $STATE == COMPLETED ]] || die "job $JOB ended $STATE: $WORK/slurm-$JOB.out"
RESTARTS=$(scontrol show job "$JOB" | sed -n 's/.*Restarts=\([0-9]*\).*/\1/p')
say "job $JOB $STATE after ${SLURM_S}s (Restarts=$RESTARTS, nodes $(scontrol show job "$JOB" | sed -n 's/^ *NodeList=\([^ ]*\).*/\1/p'))"
[[ $RESTARTS == 1 ]] || die "job $JOB restarted $RESTARTS times, expected 1"

# ---- checks --------------------------------------------------------------------------------
"$PYTHON" - "$WORK" "$JOB" "$TOL" <<'EOF'
import json, os, re, sys

work, job, tol = sys.argv[1], sys.argv[2], float(sys.argv[3])

def last_per_step(run):
    """metrics.jsonl's last record of each step (a resumed run logs again the steps after its
    checkpoint; the trainer also trims the file back to the checkpoint's step when it resumes)."""
    records = {}
    with open(os.path.join(work, run, "metrics.jsonl")) as fh:
        for line in fh:
            r = json.loads(line)
            records[r["step"]] = r
    return records

direct = last_per_step("out_direct")
slurm = last_per_step("out_slurm")
log = open(os.path.join(work, "out_slurm", "train.log")).read()
seen = {}
for step in re.findall(r"^step (\d+)/", log, re.M):  # train.log keeps both attempts' step lines
    seen[int(step)] = seen.get(int(step), 0) + 1
resumed = re.findall(r"resumed from (\S+) at step (\d+)", log)
out = open(os.path.join(work, f"slurm-{job}.out")).read()
failures = []
if len(resumed) != 1:
    failures.append(f"expected one 'resumed from ... at step N' in out_slurm/train.log, found {len(resumed)}")
if out.count("config: valid") != 2:
    failures.append(f"expected the sbatch script to run twice (two dry runs in slurm-{job}.out), found {out.count('config: valid')}")
latest = {run: open(os.path.join(work, run, "checkpoints", "latest")).read().strip() for run in ("out_direct", "out_slurm")}
if latest["out_slurm"] != latest["out_direct"]:
    failures.append(f"last checkpoint: SLURM {latest['out_slurm']}, uninterrupted {latest['out_direct']}")
if sorted(slurm) != sorted(direct):
    failures.append(f"steps differ: SLURM {min(slurm)}..{max(slurm)} ({len(slurm)}), uninterrupted {min(direct)}..{max(direct)} ({len(direct)})")
common = sorted(set(slurm) & set(direct))
# The loss, and the gradient norm: the first to show optimizer state or data order restored wrong.
worst = {}
for key in ("loss", "grad_norm"):
    diffs = {s: abs(slurm[s][key] - direct[s][key]) for s in common}
    worst[key] = max(diffs, key=diffs.get), max(diffs.values())
    if worst[key][1] > tol:
        step = worst[key][0]
        failures.append(f"{key} differs at step {step}: SLURM {slurm[step][key]!r}, uninterrupted {direct[step][key]!r}")
bitwise = all(slurm[s][k] == direct[s][k] for s in common for k in ("loss", "grad_norm"))
redone = [s for s, n in sorted(seen.items()) if n > 1]
print(f"resumed: {resumed[0][0]} at step {resumed[0][1]}" if resumed else "resumed: never")
print(f"steps run twice (train.log; after the checkpoint, before the requeue stopped the job): {redone[0]}..{redone[-1]}" if redone else
      "steps run twice: none (the requeue landed on a checkpoint)")
print(f"{len(common)} steps, max |SLURM - uninterrupted| (tolerance {tol:g}): "
      + ", ".join(f"{k} {d:.3g} (step {s})" for k, (s, d) in worst.items())
      + (" - bitwise equal" if bitwise else "")
      + f"; final loss {slurm[max(slurm)]['loss']:.6f}; last checkpoint {latest['out_slurm']}")
if failures:
    print("FAIL: " + "; ".join(failures))
    sys.exit(1)
EOF
say "PASS: sbatch -> 2 nodes -> srun torchrun -> checkpoint -> scontrol requeue -> resumed, losses equal the uninterrupted run (total $(( $(date +%s) - STARTED ))s)"
