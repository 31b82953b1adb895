#!/bin/sh
# Slurm Prolog: describe the job to fabric-agent in a job file, then return.
#
# Writes $FABRIC_JOB_DIR/slurm-job-<id>.json: the job's user, its GPUs on this node, a
# lease (its time limit plus a margin) and, when the job's partition has a class, the
# policy, class and cgroup its traffic joins (README "Slurm": the job file). The agent
# watches the directory; the prolog never calls or waits on it, and runs only local
# commands, each with a deadline. Settings: slurm.conf.example.
#
# A failure never fails the job: a non-zero Prolog drains the node and requeues the job,
# far worse than a job that runs unshaped. Errors are logged and the prolog writes what
# it can (without qos when the class cannot be given) and exits 0; with FABRIC_STRICT=1
# it exits 1 and writes nothing.
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

# The longest lease the agent takes: 30 days.
MAX_LEASE_S=2592000
NEWLINE='
'

problem() {
    # problem MESSAGE: log an error; with FABRIC_STRICT=1 exit 1 before anything is
    # written. Otherwise the prolog goes on and writes what it can.
    if [ "$FABRIC_STRICT" = 1 ]; then
        fabric_log err "job ${SLURM_JOB_ID:-?}: $1 (FABRIC_STRICT=1: exit 1, no job file)"
        exit 1
    fi
    fabric_log err "job ${SLURM_JOB_ID:-?}: $1"
}

number() {
    # number TEXT: sets value to the decimal TEXT without leading zeros (which $(( ))
    # would read as octal); fails for anything but 1 to 12 digits (no overflow below).
    case $1 in
        '' | *[!0-9]*) return 1 ;;
    esac
    [ ${#1} -le 12 ] || return 1
    value=$1
    while :; do
        case $value in
            0?*) value=${value#0} ;;
            *) return 0 ;;
        esac
    done
}

duration_seconds() {
    # duration_seconds TEXT: sets seconds from N, Ns, Nm, Nh or Nd.
    case $1 in
        *s) number "${1%s}" && seconds=$value ;;
        *m) number "${1%m}" && seconds=$((value * 60)) ;;
        *h) number "${1%h}" && seconds=$((value * 3600)) ;;
        *d) number "${1%d}" && seconds=$((value * 86400)) ;;
        *) number "$1" && seconds=$value ;;
    esac
}

limit_seconds() {
    # limit_seconds LIMIT: sets seconds from a Slurm time limit: D-HH:MM:SS, D-HH:MM,
    # D-HH, HH:MM:SS, MM:SS or MM. Fails for UNLIMITED, NOT_SET, INVALID and the rest.
    days=0
    case $1 in
        *-*)
            number "${1%%-*}" || return 1
            days=$value
            rest=${1#*-}
            case $rest in
                *:*:*) h=${rest%%:*} rest=${rest#*:} m=${rest%%:*} s=${rest#*:} ;;
                *:*) h=${rest%%:*} m=${rest#*:} s=0 ;;
                *) h=$rest m=0 s=0 ;;
            esac
            ;;
        *:*:*) h=${1%%:*} rest=${1#*:} m=${rest%%:*} s=${rest#*:} ;;
        *:*) h=0 m=${1%%:*} s=${1#*:} ;;
        *) h=0 m=$1 s=0 ;;
    esac
    number "$h" && h=$value && number "$m" && m=$value && number "$s" && s=$value || return 1
    seconds=$((((days * 24 + h) * 60 + m) * 60 + s))
}

json_string() {
    # json_string TEXT: sets json to TEXT as a JSON string. Fails for text a job file
    # must not carry: anything but printable characters in UTF-8.
    case $1 in
        *[[:cntrl:]]*) return 1 ;;
        *[![:print:]]*)
            # Non-ASCII: letters, marks, numbers, punctuation and symbols in valid UTF-8
            # (what Python calls printable), or the agent refuses the whole file. No
            # separators but space, no format or private-use characters.
            printf '%s' "$1" | LC_ALL=C.UTF-8 grep -qxP '[\p{L}\p{M}\p{N}\p{P}\p{S} ]*' ||
                return 1
            ;;
    esac
    rest=$1
    json=
    while :; do
        head=${rest%%[\\\"]*}
        [ "$head" = "$rest" ] && break
        rest=${rest#"$head"}
        json=$json$head\\${rest%"${rest#?}"}
        rest=${rest#?}
    done
    json=\"$json$rest\"
}

replace_all() {
    # replace_all TEXT FROM TO: sets replaced to TEXT with every FROM replaced by TO,
    # taking TO literally (sed would read & and \ in a node name).
    rest=$1
    replaced=
    while :; do
        case $rest in
            *"$2"*)
                replaced=$replaced${rest%%"$2"*}$3
                rest=${rest#*"$2"}
                ;;
            *) break ;;
        esac
    done
    replaced=$replaced$rest
}

node_name() {
    # Sets node to SLURMD_NODENAME when it can name a directory, else fails.
    node=${SLURMD_NODENAME:-}
    case $node in
        '' | .* | *[!A-Za-z0-9._-]*) node= && return 1 ;;
    esac
}

job_class() {
    # Sets class: FABRIC_CLASS_<partition> (as written, then upper case), else
    # FABRIC_CLASS.
    class=${FABRIC_CLASS:-}
    partition=${SLURM_JOB_PARTITION:-}
    [ -n "$partition" ] || return 0
    key=$(printf '%s' "$partition" | tr -c 'A-Za-z0-9_' '_')
    upper=$(printf '%s' "$key" | tr '[:lower:]' '[:upper:]')
    for name in "FABRIC_CLASS_$key" "FABRIC_CLASS_$upper"; do
        eval "value=\${$name:-}"
        if [ -n "$value" ]; then
            class=$value
            return 0
        fi
    done
}

cgroup2_root() {
    # Sets root: FABRIC_CGROUP_ROOT, else the first cgroup2 mount in mountinfo (empty
    # when there is none). A line: ID PARENT MAJ:MIN ROOT MOUNT-POINT OPTIONS ... -
    # FSTYPE SOURCE SUPER-OPTIONS.
    root=$FABRIC_CGROUP_ROOT
    [ -z "$root" ] || return 0
    mountinfo=$FABRIC_PROC_ROOT/self/mountinfo
    [ -r "$mountinfo" ] || return 0
    while read -r _ _ _ _ point rest; do
        case " $rest " in
            *' - cgroup2 '*)
                root=$point
                return 0
                ;;
        esac
    done <"$mountinfo"
}

has_cgroup_v1() {
    # Whether this process sits in cgroup v1 hierarchies: on a unified host
    # /proc/self/cgroup holds the one line 0::/PATH; hybrid and v1 hosts add a line per
    # v1 hierarchy.
    proc_cgroup=$FABRIC_PROC_ROOT/self/cgroup
    [ -r "$proc_cgroup" ] || return 1
    while IFS= read -r line; do
        case $line in
            0::*) ;;
            *) return 0 ;;
        esac
    done <"$proc_cgroup"
    return 1
}

job_cgroup() {
    # Sets cgroup: the job's cgroup relative to the cgroup2 mount, from
    # FABRIC_SLURM_CGROUP_TEMPLATE or else from the scope slurmd made; fails (logged)
    # when there is none to give.
    if [ -n "$FABRIC_SLURM_CGROUP_TEMPLATE" ]; then
        replace_all "$FABRIC_SLURM_CGROUP_TEMPLATE" %j "$SLURM_JOB_ID"
        case $replaced in
            *%n*)
                if ! node_name; then
                    problem "FABRIC_SLURM_CGROUP_TEMPLATE uses %n but SLURMD_NODENAME '${SLURMD_NODENAME:-}' is not a node name; the job file has no qos"
                    return 1
                fi
                replace_all "$replaced" %n "$node"
                ;;
        esac
        case /$replaced/ in
            //* | */../* | */./* | *//*)
                problem "FABRIC_SLURM_CGROUP_TEMPLATE '$FABRIC_SLURM_CGROUP_TEMPLATE' gives '$replaced', not a path relative to the cgroup2 mount; the job file has no qos"
                return 1
                ;;
        esac
        cgroup=$replaced
        return 0
    fi

    cgroup2_root
    if [ -z "$root" ]; then
        problem "not classified by cgroup: no cgroup2 filesystem is mounted ($FABRIC_PROC_ROOT/self/mountinfo), so Slurm's cgroup/v2 plugin cannot run here. Boot the node with a unified cgroup v2 hierarchy (systemd.unified_cgroup_hierarchy=1) and set CgroupPlugin=cgroup/v2 in cgroup.conf; the job file has no qos"
        return 1
    fi
    # slurmd makes the scope at start: system.slice/<NodeName>_slurmstepd.scope when
    # built with --enable-multiple-slurmd (Debian), system.slice/slurmstepd.scope
    # otherwise. The job's own cgroup appears only after the prolog.
    looked=
    node_name || true
    for scope in ${node:+"${node}_slurmstepd.scope"} slurmstepd.scope; do
        if [ -d "$root/system.slice/$scope" ]; then
            cgroup=system.slice/$scope/job_$SLURM_JOB_ID
            return 0
        fi
        looked="$looked${looked:+ and }$root/system.slice/$scope"
    done
    if has_cgroup_v1; then
        problem "not classified by cgroup: looked for Slurm's cgroup v2 scope $looked, found none, and this host is hybrid or cgroup v1 ($FABRIC_PROC_ROOT/self/cgroup lists v1 hierarchies beside cgroup2 at $root). Slurm's cgroup/v2 plugin refuses hybrid hosts ('Hybrid mode is not supported'); cgroup/v1 leaves every job in the cgroup2 root. Boot the node with a unified cgroup v2 hierarchy (systemd.unified_cgroup_hierarchy=1) and set CgroupPlugin=cgroup/v2 in cgroup.conf; the job file has no qos"
    else
        problem "not classified by cgroup: looked for Slurm's cgroup v2 scope $looked and found none. Is slurmd running with CgroupPlugin=cgroup/v2 (cgroup.conf)? Set FABRIC_SLURM_CGROUP_TEMPLATE if jobs live elsewhere; the job file has no qos"
    fi
    return 1
}

squeue_limit() {
    # Sets limit and seconds to the job's time limit from squeue, or reason to why
    # there is none.
    limit=
    if [ ! -e "$FABRIC_SQUEUE" ]; then
        reason="$FABRIC_SQUEUE not found"
        return 1
    fi
    # timeout puts squeue in its own process group and signals all of it, so nothing
    # squeue started keeps the output pipe (and this prolog) open.
    limit=$(timeout -k 1 "$FABRIC_SQUEUE_TIMEOUT" "$FABRIC_SQUEUE" -h -j "$SLURM_JOB_ID" \
        -o %l 2>/dev/null)
    status=$?
    limit=${limit%%"$NEWLINE"*}
    case $status in
        0) ;;
        124 | 137)
            reason="squeue timed out after ${FABRIC_SQUEUE_TIMEOUT}s"
            return 1
            ;;
        *)
            reason="squeue failed (exit $status)"
            return 1
            ;;
    esac
    if [ "$limit" = UNLIMITED ]; then
        reason="job has no time limit (UNLIMITED)"
        return 1
    fi
    limit_seconds "$limit" && return 0
    # What squeue printed is shown only when it is short and plain.
    case $limit in
        '' | *[![:alnum:]_:-]*) reason="time limit from squeue not understood" ;;
        *)
            if [ ${#limit} -le 32 ]; then
                reason="time limit '$limit' from squeue not understood"
            else
                reason="time limit from squeue not understood"
            fi
            ;;
    esac
    return 1
}

job_lease() {
    # Sets expires_at and lease (why that expiry, for operators).
    now=$(date +%s)
    # Slurm 23.02 and later give the prolog the job's end time; 22.05 does not.
    end=${SLURM_JOB_END_TIME:-}
    if number "$end" && [ "$value" -gt "$now" ]; then
        expires_at=$((value + margin_s))
        lease="job end time $value (SLURM_JOB_END_TIME) + ${margin_s}s margin"
    elif squeue_limit; then
        expires_at=$((now + seconds + margin_s))
        lease="time limit $limit (squeue) + ${margin_s}s margin"
    else
        case $reason in
            'job has no time limit'*) ;;
            *) fabric_log warning "job $SLURM_JOB_ID: $reason: lease FABRIC_LEASE_TTL $FABRIC_LEASE_TTL" ;;
        esac
        expires_at=$((now + ttl_s))
        lease="FABRIC_LEASE_TTL $FABRIC_LEASE_TTL: $reason"
    fi
    if [ "$expires_at" -gt $((now + MAX_LEASE_S)) ]; then
        expires_at=$((now + MAX_LEASE_S))
        lease="$lease, capped at 30 days"
    fi
    if [ ${#lease} -gt 256 ]; then
        lease="FABRIC_LEASE_TTL $FABRIC_LEASE_TTL: squeue unusable (see the log)"
    fi
}

job_gpus() {
    # Sets gpus_json (entries of a JSON list) and gpus_text (for the log) from
    # SLURM_JOB_GPUS, else CUDA_VISIBLE_DEVICES: indices, or GPU-/MIG- UUIDs.
    gpus_json=
    gpus_text=
    source_name=SLURM_JOB_GPUS
    list=${SLURM_JOB_GPUS:-}
    if [ -z "$list" ]; then
        source_name=CUDA_VISIBLE_DEVICES
        list=${CUDA_VISIBLE_DEVICES:-}
    fi
    # Slurm's word for a job without GPUs.
    [ "$list" != NoDevFiles ] || list=
    count=0
    dropped=
    saved_ifs=$IFS
    IFS=,
    set -f
    for gpu in $list; do
        case $gpu in
            '') continue ;;
            *[!0-9]*)
                case $gpu in
                    GPU-*[!0-9A-Fa-f-]* | MIG-*[!0-9A-Za-z/-]*) ok=0 ;;
                    GPU-?* | MIG-?*) ok=1 ;;
                    *) ok=0 ;;
                esac
                ;;
            *) ok=1 ;;
        esac
        [ ${#gpu} -le 64 ] || ok=0
        if [ "$ok" = 0 ]; then
            # The log shows the first few.
            [ ${#dropped} -gt 200 ] || dropped="$dropped${dropped:+,}$gpu"
        elif [ "$count" -ge 64 ]; then
            fabric_log warning "job $SLURM_JOB_ID: $source_name: more than 64 GPUs, kept the first 64"
            break
        else
            count=$((count + 1))
            gpus_json="$gpus_json${gpus_json:+, }\"$gpu\""
            gpus_text="$gpus_text${gpus_text:+,}$gpu"
        fi
    done
    set +f
    IFS=$saved_ifs
    if [ -n "$dropped" ]; then
        if json_string "$dropped"; then
            dropped=$json
        else
            dropped='(unprintable)'
        fi
        fabric_log warning "job $SLURM_JOB_ID: $source_name: dropped entries that are neither GPU indices nor GPU-/MIG- UUIDs: $dropped"
    fi
}

write_job_file() {
    # write_job_file DOCUMENT: $FABRIC_JOB_DIR/slurm-job-<id>.json, replaced whole: a
    # dotfile in the same directory (the agent ignores those) renamed onto the name.
    dir=$FABRIC_JOB_DIR
    if [ -L "$dir" ]; then
        problem "FABRIC_JOB_DIR $dir is a symbolic link; no job file written"
        return 1
    fi
    if [ ! -e "$dir" ]; then
        # Parents get 0755 from the umask.
        # shellcheck disable=SC2174
        if ! error=$(mkdir -p -m 0755 -- "$dir" 2>&1); then
            problem "cannot create FABRIC_JOB_DIR $dir: $error; no job file written"
            return 1
        fi
    elif [ ! -d "$dir" ]; then
        problem "FABRIC_JOB_DIR $dir is not a directory; no job file written"
        return 1
    fi
    # The agent reads only a directory no one else can write to.
    mode=$(stat -c %a -- "$dir" 2>/dev/null) || mode=
    case $mode in
        *[2367]? | *[2367]) mode_ok=0 ;;
        *) mode_ok=1 ;;
    esac
    if [ "$mode_ok" = 0 ] || [ ! -O "$dir" ]; then
        problem "FABRIC_JOB_DIR $dir (mode ${mode:-?}) is writable by others or not owned by this user, and the agent will not read it; no job file written"
        return 1
    fi
    file=$dir/slurm-job-$SLURM_JOB_ID.json
    temporary=$dir/.slurm-job-$SLURM_JOB_ID.json.$$.tmp
    if ! error=$({ printf '%s\n' "$1" >"$temporary" && mv -f -T -- "$temporary" "$file"; } 2>&1); then
        rm -f -- "$temporary"
        problem "cannot write $file: $error"
        return 1
    fi
}

if [ -n "$fabric_conf_error" ]; then
    problem "$FABRIC_SLURM_CONF ignored: $fabric_conf_error"
fi
if ! fabric_check_job_id; then
    problem "SLURM_JOB_ID '$SLURM_JOB_ID' is not a job id; no job file written"
    exit 0
fi

# Settings, checked before anything is written; a bad one is replaced by its default.
if ! number "$FABRIC_LEASE_MARGIN_S"; then
    problem "FABRIC_LEASE_MARGIN_S '$FABRIC_LEASE_MARGIN_S' is not a number of seconds; using 3600"
    value=3600
fi
margin_s=$value
if ! duration_seconds "$FABRIC_LEASE_TTL"; then
    problem "FABRIC_LEASE_TTL '$FABRIC_LEASE_TTL' is not a duration (N, Ns, Nm, Nh, Nd); using 24h"
    FABRIC_LEASE_TTL=24h
    seconds=86400
fi
ttl_s=$seconds
# timeout 0 would mean no deadline at all.
case $FABRIC_SQUEUE_TIMEOUT in
    *[!0-9.]* | *.*.* | .* | *.) squeue_timeout_ok=0 ;;
    *[1-9]*) squeue_timeout_ok=1 ;;
    *) squeue_timeout_ok=0 ;;
esac
if [ "$squeue_timeout_ok" = 0 ]; then
    problem "FABRIC_SQUEUE_TIMEOUT '$FABRIC_SQUEUE_TIMEOUT' is not a number of seconds above 0; using 2"
    FABRIC_SQUEUE_TIMEOUT=2
fi

# The QoS part: a class for the job's partition, and the cgroup to put in it.
qos_json=
qos_text="no qos"
job_class
if [ -z "$class" ]; then
    # Nothing configured for this job's partition: by design, not a failure.
    qos_text="no qos (no FABRIC_CLASS for partition ${SLURM_JOB_PARTITION:-(none)})"
elif [ -z "${FABRIC_POLICY:-}" ]; then
    problem "FABRIC_CLASS is set but FABRIC_POLICY is not (in $FABRIC_SLURM_CONF); the job file has no qos"
elif job_cgroup; then
    if ! json_string "$FABRIC_POLICY"; then
        problem "FABRIC_POLICY holds characters that are not printable or bytes that are not UTF-8; the job file has no qos"
    else
        policy_json=$json
        if ! json_string "$class"; then
            problem "the class for partition ${SLURM_JOB_PARTITION:-(none)} holds characters that are not printable or bytes that are not UTF-8; the job file has no qos"
        else
            class_json=$json
            if ! json_string "$cgroup"; then
                problem "the job's cgroup holds characters that are not printable or bytes that are not UTF-8; the job file has no qos"
            else
                qos_json="{\"policy\": $policy_json, \"className\": $class_json, \"cgroup\": $json}"
                qos_text="qos $FABRIC_POLICY/$class for $cgroup"
            fi
        fi
    fi
fi

job_gpus
job_lease

document="{\"version\": 1, \"scheduler\": \"slurm\", \"job_id\": \"$SLURM_JOB_ID\""
user=${SLURM_JOB_USER:-}
if [ -n "$user" ]; then
    characters=${#user}
    if [ "$characters" -gt 64 ]; then
        # ${#} counts bytes in most shells: count the UTF-8 characters.
        characters=$(printf '%s' "$user" | LC_ALL=C tr -d '\200-\277' | wc -c)
    fi
    if [ "$characters" -le 64 ] && json_string "$user"; then
        document="$document, \"user\": $json"
    else
        fabric_log warning "job $SLURM_JOB_ID: SLURM_JOB_USER is not a printable name of at most 64 characters; the job file has no user"
    fi
fi
[ -z "$gpus_json" ] || document="$document, \"gpus\": [$gpus_json]"
document="$document, \"expires_at\": $expires_at"
if json_string "$lease"; then
    document="$document, \"lease\": $json"
fi
[ -z "$qos_json" ] || document="$document, \"qos\": $qos_json"
document="$document}"

# The agent reads at most 16 KiB.
if [ ${#document} -gt 16383 ]; then
    problem "the job file would exceed 16 KiB; no job file written"
    exit 0
fi
write_job_file "$document" || exit 0
fabric_log info "job $SLURM_JOB_ID: wrote $file: ${gpus_text:+gpus $gpus_text, }$qos_text; lease: $lease"
exit 0
