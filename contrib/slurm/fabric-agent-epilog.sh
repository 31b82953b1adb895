#!/bin/sh
# Slurm Epilog: remove the job's QoS assignment (slurm-job-<id>) from this node.
#
# One already gone (its lease expired, or the prolog assigned nothing) is fine. The
# epilog always exits 0: a failing Epilog drains the node, and an assignment left
# behind is removed by its lease anyway. Failures are logged (logger -t
# fabric-agent-slurm). Settings: slurm.conf.example.
set -u

# --- settings: see slurm.conf.example (same in both hooks) ---
FABRIC_SLURM_CONF=${FABRIC_SLURM_CONF:-/etc/fabric-agent/slurm.conf}
if [ -r "$FABRIC_SLURM_CONF" ]; then
    # shellcheck source=/dev/null
    . "$FABRIC_SLURM_CONF"
fi

FABRIC_AGENT=${FABRIC_AGENT:-unix:///run/fabric-agent/agent.sock}
FABRIC_SLURM_CGROUP_TEMPLATE=${FABRIC_SLURM_CGROUP_TEMPLATE:-system.slice/slurmstepd.scope/job_%j}
FABRIC_LEASE_TTL=${FABRIC_LEASE_TTL:-24h}
FABRIC_LEASE_MARGIN_S=${FABRIC_LEASE_MARGIN_S:-3600}
FABRIC_TIMEOUT=${FABRIC_TIMEOUT:-10s}
FABRIC_STRICT=${FABRIC_STRICT:-0}
FABRICCTL=${FABRICCTL:-fabricctl}
# Set by slurmd for Prolog and Epilog.
SLURM_JOB_ID=${SLURM_JOB_ID:-}

fabric_log() {
    # fabric_log PRIORITY MESSAGE: syslog (journal) through logger, stderr without it.
    if command -v logger >/dev/null 2>&1; then
        logger -t fabric-agent-slurm -p "daemon.$1" -- "$2"
    else
        printf 'fabric-agent-slurm: %s\n' "$2" >&2
    fi
}

fabric_job_name() {
    printf 'slurm-job-%s' "$SLURM_JOB_ID"
}

fabric_check_job_id() {
    case ${SLURM_JOB_ID} in
        '' | *[!0-9]*) return 1 ;;
    esac
    return 0
}

fabric_ctl() {
    # fabric_ctl ARGS...: fabricctl against the configured agent.
    "$FABRICCTL" --agent "$FABRIC_AGENT" --timeout "$FABRIC_TIMEOUT" "$@"
}
# --- end of settings ---

if ! fabric_check_job_id; then
    fabric_log err "SLURM_JOB_ID '${SLURM_JOB_ID}' is not a job id"
    exit 0
fi
name=$(fabric_job_name)
if output=$(fabric_ctl policy delete "$name" --ignore-not-found 2>&1); then
    fabric_log info "job $SLURM_JOB_ID: $(printf '%s' "$output" | head -n 1)"
else
    fabric_log err "job $SLURM_JOB_ID: cannot delete $name (its lease will): $(printf '%s' "$output" | tr '\n' ' ')"
fi
exit 0
