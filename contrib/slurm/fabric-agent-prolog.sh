#!/bin/sh
# Slurm Prolog: give the job's cgroup its QoS class on this node.
#
# Applies a QosAssignment named slurm-job-<id> that puts the job's cgroup
# (system.slice/slurmstepd.scope/job_<id>) into FABRIC_CLASS of FABRIC_POLICY, with a
# lease of the job's time limit plus a margin, so it goes away even if the epilog never
# runs. Settings: slurm.conf.example.
#
# A failure never fails the job: a non-zero Prolog drains the node and requeues the job,
# far worse than a job that runs unshaped. It is logged (logger -t fabric-agent-slurm)
# and the prolog exits 0, unless FABRIC_STRICT=1.
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

# The agent refuses leases beyond 30 days.
FABRIC_MAX_LEASE_S=2592000

fail() {
    fabric_log err "job ${SLURM_JOB_ID:-?}: $1"
    if [ "$FABRIC_STRICT" = 1 ]; then
        exit 1
    fi
    exit 0
}

digits() {
    # The decimal value of $1 (leading zeros would read as octal in $(( ))); fails if
    # $1 is not a number.
    case $1 in
        '' | *[!0-9]*) return 1 ;;
    esac
    value=$(printf '%s' "$1" | sed 's/^0*//')
    printf '%s' "${value:-0}"
}

limit_seconds() {
    # Seconds of a Slurm time limit: D-HH:MM:SS, D-HH:MM, D-HH, HH:MM:SS, MM:SS, MM.
    # Fails for UNLIMITED, NOT_SET, INVALID, empty or anything else.
    limit=$1
    days=0
    case $limit in
        *-*)
            days=$(digits "${limit%%-*}") || return 1
            rest=${limit#*-}
            case $rest in
                *:*:*) h=${rest%%:*} rest=${rest#*:} m=${rest%%:*} s=${rest#*:} ;;
                *:*) h=${rest%%:*} m=${rest#*:} s=0 ;;
                *) h=$rest m=0 s=0 ;;
            esac
            ;;
        *:*:*) h=${limit%%:*} rest=${limit#*:} m=${rest%%:*} s=${rest#*:} ;;
        *:*) h=0 m=${limit%%:*} s=${limit#*:} ;;
        *) h=0 m=$limit s=0 ;;
    esac
    h=$(digits "$h") && m=$(digits "$m") && s=$(digits "$s") || return 1
    printf '%s' $((((days * 24 + h) * 60 + m) * 60 + s))
}

lease_ttl() {
    # The job's time limit plus the margin (capped at the agent's 30 days), or
    # FABRIC_LEASE_TTL when the limit is unknown or unlimited.
    if command -v squeue >/dev/null 2>&1; then
        limit=$(squeue -h -j "$SLURM_JOB_ID" -o %l 2>/dev/null | head -n 1)
    else
        limit=
    fi
    if seconds=$(limit_seconds "$limit") && margin=$(digits "$FABRIC_LEASE_MARGIN_S"); then
        seconds=$((seconds + margin))
        if [ "$seconds" -gt "$FABRIC_MAX_LEASE_S" ]; then
            seconds=$FABRIC_MAX_LEASE_S
        fi
        printf '%ss' "$seconds"
    else
        printf '%s' "$FABRIC_LEASE_TTL"
    fi
}

job_class() {
    # FABRIC_CLASS_<partition> (as written, then upper case), else FABRIC_CLASS.
    partition=${SLURM_JOB_PARTITION:-}
    if [ -n "$partition" ]; then
        key=$(printf '%s' "$partition" | tr -c 'A-Za-z0-9_' '_')
        upper=$(printf '%s' "$key" | tr '[:lower:]' '[:upper:]')
        for name in "FABRIC_CLASS_$key" "FABRIC_CLASS_$upper"; do
            eval "value=\${$name:-}"
            if [ -n "$value" ]; then
                printf '%s' "$value"
                return 0
            fi
        done
    fi
    printf '%s' "${FABRIC_CLASS:-}"
}

quote() {
    # A single-quoted YAML scalar.
    printf "'%s'" "$(printf '%s' "$1" | sed "s/'/''/g")"
}

fabric_check_job_id || fail "SLURM_JOB_ID '${SLURM_JOB_ID}' is not a job id"
class=$(job_class)
if [ -z "$class" ]; then
    # Nothing configured for this job's partition: by design, not a failure.
    fabric_log info "job $SLURM_JOB_ID: no FABRIC_CLASS for partition ${SLURM_JOB_PARTITION:-(none)}, no QoS assignment"
    exit 0
fi
[ -n "${FABRIC_POLICY:-}" ] || fail "FABRIC_CLASS is set but FABRIC_POLICY is not (in $FABRIC_SLURM_CONF)"

name=$(fabric_job_name)
cgroup=$(printf '%s' "$FABRIC_SLURM_CGROUP_TEMPLATE" | sed "s/%j/$SLURM_JOB_ID/g")
ttl=$(lease_ttl)

document="apiVersion: fabric.qos/v1alpha1
kind: QosAssignment
metadata:
  name: $name
spec:
  policy: $(quote "$FABRIC_POLICY")
  className: $(quote "$class")
  match:
    - cgroup: $(quote "$cgroup")
"

if output=$(printf '%s' "$document" | fabric_ctl policy apply -f - --ttl "$ttl" 2>&1); then
    fabric_log info "job $SLURM_JOB_ID: $cgroup in $FABRIC_POLICY/$class, lease $ttl: $(printf '%s' "$output" | head -n 1)"
    exit 0
fi
fail "cannot assign $cgroup to $FABRIC_POLICY/$class: $(printf '%s' "$output" | tr '\n' ' ')"
