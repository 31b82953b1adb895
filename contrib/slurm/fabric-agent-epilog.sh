#!/bin/sh
# Slurm Epilog: remove the job's file (slurm-job-<id>.json) from fabric-agent's job
# directory; the agent then drops the job and its QoS class.
#
# A file already gone (the prolog wrote none, or its lease ran out) is fine. The epilog
# always exits 0: a failing Epilog drains the node, and a file left behind is removed by
# the agent when its lease runs out. Settings: slurm.conf.example.
set -u

# --- settings: see slurm.conf.example (same in both hooks) ---
# Slurm runs its hooks with no PATH, and shells fill in their own default (bash's may
# end in "."): the hooks set one. Tools other than coreutils have settings below.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
umask 022
FABRIC_SLURM_CONF=${FABRIC_SLURM_CONF:-/etc/fabric-agent/slurm.conf}
fabric_conf_error=
if [ -r "$FABRIC_SLURM_CONF" ]; then
    # A syntax error in a sourced file would end this shell (exit 2: the node drains),
    # so the file is tried in a subshell first and ignored, with an error, if it fails.
    # shellcheck source=/dev/null
    if fabric_conf_error=$( (. "$FABRIC_SLURM_CONF" >/dev/null; exit 0) 2>&1 >/dev/null); then
        # shellcheck source=/dev/null
        . "$FABRIC_SLURM_CONF" >/dev/null
        fabric_conf_error=
    else
        fabric_conf_error=${fabric_conf_error:-cannot be read as shell}
    fi
fi

# Every default, in one place.
FABRIC_JOB_DIR=${FABRIC_JOB_DIR:-/run/fabric-agent/jobs}
FABRIC_SLURM_CGROUP_TEMPLATE=${FABRIC_SLURM_CGROUP_TEMPLATE:-}
FABRIC_CGROUP_ROOT=${FABRIC_CGROUP_ROOT:-}
FABRIC_PROC_ROOT=${FABRIC_PROC_ROOT:-/proc}
FABRIC_SQUEUE=${FABRIC_SQUEUE:-/usr/bin/squeue}
FABRIC_SQUEUE_TIMEOUT=${FABRIC_SQUEUE_TIMEOUT:-2}
FABRIC_LOGGER=${FABRIC_LOGGER:-/usr/bin/logger}
FABRIC_SYSLOG_SOCKET=${FABRIC_SYSLOG_SOCKET:-/dev/log}
FABRIC_LEASE_TTL=${FABRIC_LEASE_TTL:-24h}
FABRIC_LEASE_MARGIN_S=${FABRIC_LEASE_MARGIN_S:-3600}
FABRIC_STRICT=${FABRIC_STRICT:-0}
# Set by slurmd for Prolog and Epilog.
SLURM_JOB_ID=${SLURM_JOB_ID:-}

fabric_log() {
    # fabric_log PRIORITY MESSAGE (PRIORITY: err, warning or info). To syslog through
    # logger when the syslog socket exists (logger drops messages silently without it);
    # otherwise to stderr. Errors and warnings go to stderr as well: slurmd logs a
    # failing hook's output with its exit code.
    if [ -S "$FABRIC_SYSLOG_SOCKET" ] && [ -x "$FABRIC_LOGGER" ] &&
        timeout -k 1 2 "$FABRIC_LOGGER" -u "$FABRIC_SYSLOG_SOCKET" -t fabric-agent-slurm \
            -p "daemon.$1" -- "$2" 2>/dev/null; then
        [ "$1" = info ] && return 0
    fi
    printf 'fabric-agent-slurm: %s: %s\n' "$1" "$2" >&2
}

fabric_check_job_id() {
    # Slurm job ids are 32-bit numbers.
    case $SLURM_JOB_ID in
        '' | *[!0-9]*) return 1 ;;
    esac
    [ ${#SLURM_JOB_ID} -le 10 ]
}
# --- end of settings ---

if [ -n "$fabric_conf_error" ]; then
    fabric_log err "$FABRIC_SLURM_CONF ignored: $fabric_conf_error"
fi
if ! fabric_check_job_id; then
    fabric_log err "SLURM_JOB_ID '$SLURM_JOB_ID' is not a job id"
    exit 0
fi
if [ -L "$FABRIC_JOB_DIR" ]; then
    fabric_log err "job $SLURM_JOB_ID: FABRIC_JOB_DIR $FABRIC_JOB_DIR is a symbolic link; left alone"
    exit 0
fi
file=$FABRIC_JOB_DIR/slurm-job-$SLURM_JOB_ID.json
if [ -e "$file" ] || [ -L "$file" ]; then
    found=1
else
    found=0
fi
# Also a temporary file of a prolog that was killed while writing.
if ! error=$(rm -f -- "$file" "$FABRIC_JOB_DIR/.slurm-job-$SLURM_JOB_ID.json."*.tmp 2>&1); then
    fabric_log err "job $SLURM_JOB_ID: cannot remove $file (the agent drops it when its lease runs out): $error"
elif [ "$found" = 1 ]; then
    fabric_log info "job $SLURM_JOB_ID: removed $file"
else
    fabric_log info "job $SLURM_JOB_ID: no job file $file"
fi
exit 0
