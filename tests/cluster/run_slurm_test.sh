#!/usr/bin/env bash
# Cluster test: run the tiny test config through a real (throw-away, one-node) SLURM cluster
# with profiles/slurm, and check it against a local run of the same config.
#
#   tests/cluster/run_slurm_test.sh        (as root on Debian; part of `make test`)
#
# 1. starts SLURM with accounting and fake GPUs (tests/cluster/slurm_cluster.sh; apt installs
#    slurm-wlm, munge, slurmdbd and mariadb-server on first use);
# 2. runs tests/config/tiny.yaml with the overrides of tests/config/cluster.yaml locally and
#    through SLURM, each in its own temporary copy of the workflow (nothing lands in the
#    checkout), and compares the results;
# 3. checks with sacct that every non-local job went through SLURM, with a log file each;
# 4. corrupts a config-referenced input: the run must fail and show the job's log; restores
#    it: the rerun must submit only the jobs that had not finished;
# 5. stops every daemon it started, by PID, also on failure or interruption.
#
# Skips (exit 0, loudly) when not root or not on Debian with apt, or, outside CI, with
# KINPET_SKIP_CLUSTER_TEST=1. It refuses to touch a machine whose /etc/slurm/slurm.conf it
# did not write (a real cluster). Concurrent runs on one machine wait for each other.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
HERE="$ROOT/tests/cluster"
BIN="${KINPET_BIN:-$ROOT/.venv/bin}"
CONFIG=tests/config/tiny.yaml
OVERRIDES=tests/config/cluster.yaml # fewer subjects, one epoch, the fast fitter only
export PATH="$BIN:$PATH" # jobs run the same snakemake/python as this script
# Reproducible-build time stamp: matplotlib then writes the same PDF bytes in both runs.
export SOURCE_DATE_EPOCH=0

banner() { printf '\n==== %s ====\n' "$*"; }
fail() {
    banner "CLUSTER TEST FAILED: $*"
    exit 1
}
skip() {
    banner "CLUSTER TEST SKIPPED: $*"
    exit 0
}

if [[ "${CI:-}" != "true" && "${KINPET_SKIP_CLUSTER_TEST:-0}" == "1" ]]; then
    skip "KINPET_SKIP_CLUSTER_TEST=1"
fi
[[ "$(id -u)" == 0 ]] || skip "needs root (it installs and starts SLURM system-wide)"
[[ -r /etc/debian_version ]] && command -v apt-get >/dev/null ||
    skip "needs Debian with apt-get"
if [[ -e /etc/slurm/slurm.conf ]] && ! grep -q 'written by kinpet' /etc/slurm/slurm.conf; then
    skip "/etc/slurm/slurm.conf belongs to a real SLURM installation: not touching it"
fi
[[ -x "$BIN/snakemake" ]] || fail "$BIN/snakemake missing: run 'make setup' first"

# One cluster test at a time on this machine (the daemons are system-wide).
mkdir -p /run/lock
exec 9>/run/lock/kinpet-slurm-test.lock
flock -w 1200 9 || fail "another cluster test holds /run/lock/kinpet-slurm-test.lock"

TMP="$(mktemp -d /tmp/kinpet-slurm-test.XXXXXX)"
cleanup() {
    local rc=$?
    set +e
    # Jobs first (only this throw-away cluster's), then the daemons, by PID file.
    if command -v squeue >/dev/null && [[ -s /run/kinpet-slurm/slurmctld.pid ]]; then
        squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null
        for _ in $(seq 1 40); do [[ -z "$(squeue -h 2>/dev/null)" ]] && break; sleep 0.5; done
    fi
    bash "$HERE/slurm_cluster.sh" stop
    if ((rc == 0)); then rm -rf "$TMP"; else echo "kept for inspection: $TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A copy of the repository's files (tracked and new, not ignored ones: no results/, .venv/).
copy_workflow() {
    mkdir -p "$1"
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
        tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$1"
    return 0
}

# snakemake in a work copy, output to a log file; never longer than 10 minutes.
run_snakemake() { # run_snakemake DIR LOG ARGS...
    local dir=$1 log=$2
    shift 2
    (cd "$dir" && timeout -k 30 600 snakemake --configfile "$CONFIG" "$OVERRIDES" "$@") >"$log" 2>&1
}

# The SLURM jobs of one snakemake run, found by the job name the plugin gives all jobs of a
# run ("SLURM run ID" in its log): "jobid state partition alloc-tres comment" per line.
slurm_jobs_of_run() { # slurm_jobs_of_run LOG
    local run_id
    run_id=$(grep -oE 'SLURM run ID: \S+' "$1" | head -1 | cut -d' ' -f4)
    [[ -n "$run_id" ]] || return 0
    sacct -X -n -P -S "$DAY0" --name "$run_id" -o JobID,State,Partition,AllocTRES,Comment |
        tr '|' ' '
}

# Jobs that snakemake sent to SLURM, from its log ("rule X:", not "localrule X:").
submitted_in_log() { grep -cE '^(rule|checkpoint) [A-Za-z0-9_]+:$' "$1" || true; }

now() { date +%s.%N; }
seconds() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$@"; }

T0=$(now)
DAY0=$(date -d '-1 hour' +%Y-%m-%dT%H:%M:%S) # sacct's search window starts here
banner "starting a one-node SLURM cluster (accounting, fake GPUs)"
bash "$HERE/slurm_cluster.sh" start || fail "could not start the cluster"
T_UP=$(now)
echo "cluster up in $(seconds "$T0" "$T_UP") s (including package installation)"

# GPU requests (the profile's train/predict) schedule on the fake GPUs, with predict's memory.
out=$(sbatch --wait --parsable -p gpu -A kinpet --gpus=1 -t 1 --mem 32000 -o /dev/null \
    --wrap 'true') || fail "a --gpus=1 job did not run"
echo "a --gpus=1 --mem 32000 job in partition gpu ran (SLURM job $out)"

LOCAL="$TMP/local"
CLUSTER="$TMP/cluster"
copy_workflow "$LOCAL"
copy_workflow "$CLUSTER"
# Fast status checks for a tiny run; logs of successful jobs kept so the test can count them.
SLURM_ARGS=(--workflow-profile profiles/slurm --slurm-init-seconds-before-status-checks 1
    --slurm-keep-successful-logs)

banner "local run of $CONFIG"
t=$(now)
run_snakemake "$LOCAL" "$TMP/local.log" --cores 2 || {
    tail -40 "$TMP/local.log"
    fail "local run failed"
}
WALL_LOCAL=$(seconds "$t" "$(now)")
echo "local run: ${WALL_LOCAL} s"

banner "SLURM run of $CONFIG (profiles/slurm)"
t=$(now)
run_snakemake "$CLUSTER" "$TMP/cluster1.log" "${SLURM_ARGS[@]}" || {
    tail -60 "$TMP/cluster1.log"
    fail "SLURM run failed"
}
WALL_CLUSTER=$(seconds "$t" "$(now)")
JOBS1="$(slurm_jobs_of_run "$TMP/cluster1.log")"
echo "$JOBS1" | sed 's/^/  sacct: /'
N1=$(grep -c . <<<"$JOBS1" || true)
EXPECTED1=$(submitted_in_log "$TMP/cluster1.log")
NLOGS=$(find "$CLUSTER/.snakemake/slurm_logs" -type f -name '*.log' 2>/dev/null | wc -l)
ARRAY1=$(awk '$1 ~ /_/' <<<"$JOBS1" | grep -c . || true)
echo "jobs through SLURM: $N1, of which $ARRAY1 array tasks" \
    "(snakemake submitted $EXPECTED1; $NLOGS job logs in .snakemake/slurm_logs)"
((N1 > 0)) || fail "no job went through SLURM"
((N1 == EXPECTED1)) || fail "sacct shows $N1 jobs, snakemake submitted $EXPECTED1"
((NLOGS == N1)) || fail "$NLOGS SLURM job logs for $N1 jobs"
NOTDONE=$(awk '$2 != "COMPLETED"' <<<"$JOBS1")
[[ -z "$NOTDONE" ]] || fail "jobs not COMPLETED: $NOTDONE"

banner "results: local vs SLURM"
python3 "$HERE/compare_results.py" "$LOCAL/results" "$CLUSTER/results" ||
    fail "SLURM results differ from the local run"
# (python3 here is the venv's: PATH starts with $BIN)

banner "a failing job: corrupt the input named by organ_values in $CONFIG"
# The failure and the resume ask only for the model-curve chain that reads organ_values
# (the phantom reads it too: corrupting it for a whole run would redo everything).
FAIL_TARGETS=(results/model/organ_curves.tsv results/figures/sampling_modes.png)
BAD=$(cd "$CLUSTER" && python3 -c \
    "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['organ_values'])" "$CONFIG")
cp -p "$CLUSTER/$BAD" "$TMP/good_input"
printf 'garbage\x01 not a table\n' >"$CLUSTER/$BAD"
# Newer than the outputs: snakemake reruns the jobs that read it.
t=$(now)
if run_snakemake "$CLUSTER" "$TMP/cluster2.log" "${SLURM_ARGS[@]}" --show-failed-logs \
    "${FAIL_TARGETS[@]}"; then
    fail "the run with a corrupted input succeeded"
fi
grep -E -A12 '^Error in rule|^RuleException|KinpetInputError|Traceback' "$TMP/cluster2.log" |
    head -40 | sed 's/^/  | /'
grep -q 'Error in rule' "$TMP/cluster2.log" ||
    fail "the failed job's error is not in snakemake's output"
# --show-failed-logs prints each log of the failed job under a "Logfile PATH:" header.
grep -qE '^Logfile .*slurm_logs/.*\.log:$' "$TMP/cluster2.log" ||
    fail "the failed job's SLURM log was not shown (--show-failed-logs)"
FAILED=$(slurm_jobs_of_run "$TMP/cluster2.log" | awk '$2 == "FAILED"' | wc -l)
echo "the run failed as expected after $(seconds "$t" "$(now)") s; FAILED jobs in sacct: $FAILED"
((FAILED >= 1)) || fail "sacct shows no FAILED job"

banner "fix the input and resume"
cp -p "$TMP/good_input" "$CLUSTER/$BAD" # original content and time stamp
t=$(now)
run_snakemake "$CLUSTER" "$TMP/cluster3.log" "${SLURM_ARGS[@]}" "${FAIL_TARGETS[@]}" || {
    tail -60 "$TMP/cluster3.log"
    fail "the resumed run failed"
}
N3=$(slurm_jobs_of_run "$TMP/cluster3.log" | grep -c . || true)
echo "resumed run: $N3 jobs through SLURM in $(seconds "$t" "$(now)") s (first run: $N1);" \
    "the others were not redone"
((N3 >= 1 && N3 < N1)) || fail "the resumed run should redo some jobs, not all ($N3 of $N1)"
python3 "$HERE/compare_results.py" "$LOCAL/results" "$CLUSTER/results" >/dev/null ||
    fail "results after resuming differ from the local run"
echo "results after resuming equal the local run"

banner "CLUSTER TEST PASSED"
echo "jobs through SLURM: $N1 (first run), $N3 (resumed run after the failure)"
echo "wall time: SLURM ${WALL_CLUSTER} s, local ${WALL_LOCAL} s (cluster config; SLURM adds" \
    "submission, status polling and a Snakemake start per job)"
echo "total test time: $(seconds "$T0" "$(now)") s"
