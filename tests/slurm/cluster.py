"""A real one-node Slurm cluster for the tests: Debian's slurm-wlm (22.05) and munge, as root,
on loopback, with everything in a throwaway directory.

`SlurmCluster.start()` writes a munge key, slurm.conf, cgroup.conf and gres.conf (four fake
GPUs: character devices made under the cluster directory) with free ports, starts munged,
slurmctld and `slurmd -N fabricnode`, and waits until the node is idle. `stop()` cancels the
jobs, ends the daemons by PID (SIGTERM, SIGKILL after a grace period), ends leftover job
processes by PID, removes the cgroup directories the cluster made (bottom-up, empty ones
only) and the directory. Nothing under /etc/slurm, /etc/munge or the system munged is used.

cgroup/v2 on a hybrid host: Slurm 22.05 refuses cgroup/v2 when /proc/self/cgroup lists v1
hierarchies ("fatal: Hybrid mode is not supported"). Development and CI hosts are often
hybrid; production GPU nodes are unified. On a hybrid host only, slurmd (and the slurmstepd
it starts, which inherits its environment) runs with cgroup_v2_only.c preloaded: it hides the
v1 lines of /proc/*/cgroup from them, nothing else. The product never depends on it. Jobs do
not get it: a job's environment is the submitter's, not slurmd's.

Prolog and Epilog in slurm.conf are wrapper scripts in the cluster directory that exec the
script a test put in place (`hooks()`), "exit 0" when none is.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port

NODE_NAME = "fabricnode"
PARTITION = "fabric"
CLUSTER_NAME = "fabrictest"
FAKE_GPUS = 4
# Between SIGTERM and SIGKILL for a daemon or a leftover job process.
STOP_GRACE_S = 10.0
# Generous: slurmctld and slurmd reach an idle node in about a second here.
START_TIMEOUT_S = 60.0
SHIM_SOURCE = Path(__file__).resolve().parent / "cgroup_v2_only.c"
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel")


class SlurmError(RuntimeError):
    """The test cluster did not do what a helper waited for; the message names what."""


def missing_requirements() -> str | None:
    """Why the cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "the Slurm test cluster runs slurmd and munged as root"
    missing = [name for name in (*PROGRAMS, "gcc") if shutil.which(name) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (make test installs them)"
    if cgroup2_mount() is None:
        return "no cgroup2 mount in /proc/self/mountinfo"
    return None


def cgroup2_mount(mountinfo: Path = Path("/proc/self/mountinfo")) -> Path | None:
    """Where the cgroup2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified
    on a hybrid host)."""
    for line in mountinfo.read_text().splitlines():
        fields, _, after = line.partition(" - ")
        if after.split(" ", 1)[0] == "cgroup2":
            return Path(fields.split(" ")[4])
    return None


def is_hybrid(proc_cgroup: Path = Path("/proc/self/cgroup")) -> bool:
    """Whether cgroup v1 hierarchies are mounted beside cgroup2 (lines other than `0::`)."""
    return any(not line.startswith("0::") for line in proc_cgroup.read_text().splitlines())


@dataclass
class Job:
    """One job as `scontrol show job -o` reports it."""

    job_id: str
    fields: dict[str, str]

    @property
    def state(self) -> str:
        return self.fields.get("JobState", "")


@dataclass
class SlurmCluster:
    """The running cluster: its directory, configuration and daemons."""

    root: Path
    cgroup_mount: Path
    ctld_port: int = 0
    slurmd_port: int = 0
    start_s: float = 0.0
    slurmd_debug: str = "debug2"
    _processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _made_system_slice: bool = False
    _helpers: list[tuple[int, str]] = field(default_factory=list)

    # --- paths ---

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    @property
    def slurmd_log(self) -> Path:
        return self.root / "log" / "slurmd.log"

    @property
    def slurmctld_log(self) -> Path:
        return self.root / "log" / "slurmctld.log"

    @property
    def scope(self) -> Path:
        """The cgroup under which slurmd puts every job (Debian builds Slurm with
        --enable-multiple-slurmd, so the scope carries the node name)."""
        return self.cgroup_mount / "system.slice" / f"{NODE_NAME}_slurmstepd.scope"

    def job_cgroup(self, job_id: str) -> str:
        """The job's cgroup relative to the cgroup2 mount, as the product names it."""
        return f"system.slice/{NODE_NAME}_slurmstepd.scope/job_{job_id}"

    def job_cgroup_path(self, job_id: str) -> Path:
        return self.cgroup_mount / self.job_cgroup(job_id)

    def env(self) -> dict[str, str]:
        """Environment for Slurm's clients: this cluster's slurm.conf, no preload, no job
        variables from an enclosing job."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
        env.pop("LD_PRELOAD", None)
        env["SLURM_CONF"] = str(self.conf)
        return env

    # --- lifecycle ---

    @classmethod
    def start(cls, root: Path | None = None, slurmd_debug: str = "debug2") -> SlurmCluster:
        """A running cluster, its node idle. `slurmd_debug`: SlurmdDebug; at debug2 and above
        slurmd logs what each Prolog and Epilog printed."""
        mount = cgroup2_mount()
        if mount is None:
            raise SlurmError("no cgroup2 mount in /proc/self/mountinfo")
        scope = mount / "system.slice" / f"{NODE_NAME}_slurmstepd.scope"
        if scope.exists():
            raise SlurmError(
                f"{scope} exists: another test cluster with node {NODE_NAME} runs, "
                "or a killed one left it (rmdir it, bottom-up, once no process is in it)"
            )
        cluster = cls(
            root=root or Path(tempfile.mkdtemp(prefix="fabric-slurm-")),
            cgroup_mount=mount,
            slurmd_debug=slurmd_debug,
        )
        began = time.monotonic()
        try:
            cluster._write_files()
            cluster._start_daemons()
            cluster.wait_node_idle(timeout_s=START_TIMEOUT_S)
            # slurmctld's slurmscriptd, to end even when slurmctld went first.
            cluster._helpers = _children(cluster._processes["slurmctld"].pid)
        except BaseException:
            cluster.stop()
            raise
        cluster.start_s = time.monotonic() - began
        return cluster

    def _write_files(self) -> None:
        self.root.chmod(0o755)
        for sub in ("munge", "state", "spool", "log", "dev", "hooks"):
            (self.root / sub).mkdir(mode=0o755)
        key = os.open(
            self.root / "munge" / "munge.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400
        )
        with os.fdopen(key, "wb") as stream:
            stream.write(os.urandom(1024))
        # Character devices like /dev/null (1:3): gres/gpu needs device files; Slurm does
        # not look behind them.
        for index in range(FAKE_GPUS):
            os.mknod(self.root / "dev" / f"fakegpu{index}", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        for hook in ("prolog", "epilog"):
            wrapper = self.root / "hooks" / hook
            target = self.root / "hooks" / f"{hook}.target"
            # Slurm runs hooks with no PATH: builtins only until the exec.
            wrapper.write_text(
                "#!/bin/sh\n"
                f"# The {hook} of the current test (tests/slurm/cluster.py), if any.\n"
                f'target=""\n[ -r {target} ] && IFS= read -r target < {target}\n'
                '[ -n "$target" ] || exit 0\n'
                'exec "$target" "$@"\n'
            )
            wrapper.chmod(0o755)
        self.ctld_port, self.slurmd_port = free_port(), free_port()
        cpus = os.cpu_count() or 1
        self.conf.write_text(
            f"""\
ClusterName={CLUSTER_NAME}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.slurmctld_log}
SlurmdLogFile={self.slurmd_log}
SlurmctldDebug=info
SlurmdDebug={self.slurmd_debug}
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup
PrologFlags=Alloc,Contain
Prolog={self.root}/hooks/prolog
Epilog={self.root}/hooks/epilog
PrologEpilogTimeout=60
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SchedulerType=sched/builtin
# Measured here: a batch job starts about 1 s after sbatch with it, 3 s without.
SchedulerParameters=sched_interval=1
MessageTimeout=10
SlurmdTimeout=30
SlurmctldTimeout=30
InactiveLimit=0
KillWait=2
MinJobAge=60
MpiDefault=none
NodeName={NODE_NAME} NodeAddr=127.0.0.1 NodeHostname=localhost CPUs={cpus} RealMemory=1000 \
Gres=gpu:{FAKE_GPUS} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE_NAME} Default=YES MaxTime=1-00:00:00 State=UP
"""
        )
        (self.root / "cgroup.conf").write_text(
            f"""\
CgroupPlugin=cgroup/v2
CgroupMountpoint={self.cgroup_mount}
# No systemd in a test container: slurmd makes its scope under system.slice itself.
IgnoreSystemd=yes
ConstrainCores=no
ConstrainDevices=no
ConstrainRAMSpace=no
"""
        )
        (self.root / "gres.conf").write_text(
            f"NodeName={NODE_NAME} Name=gpu File={self.root}/dev/fakegpu[0-{FAKE_GPUS - 1}]\n"
        )

    def _start_daemons(self) -> None:
        env = self.env()
        munge_dir = self.root / "munge"
        self._spawn(
            "munged",
            ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
             f"--key-file={munge_dir}/munge.key", f"--pid-file={munge_dir}/munged.pid",
             f"--seed-file={munge_dir}/munged.seed", f"--log-file={munge_dir}/munged.log"],
            env,
        )  # fmt: skip
        _wait_for(lambda: self.munge_socket.exists(), 10.0, f"munged socket {self.munge_socket}")
        self._spawn("slurmctld", ["slurmctld", "-D", "-c"], env)
        # slurmd needs system.slice to make its scope in when systemd does not.
        system_slice = self.cgroup_mount / "system.slice"
        if not system_slice.exists():
            system_slice.mkdir()
            self._made_system_slice = True
        slurmd_env = dict(env)
        if is_hybrid():
            slurmd_env["LD_PRELOAD"] = str(self._build_shim())
        self._spawn("slurmd", ["slurmd", "-D", "-N", NODE_NAME], slurmd_env)

    def _build_shim(self) -> Path:
        library = self.root / "cgroup_v2_only.so"
        subprocess.run(
            ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-o",
             str(library), str(SHIM_SOURCE), "-ldl"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        return library

    def _spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> None:
        with (self.root / "log" / f"{name}.out").open("wb") as out:
            self._processes[name] = subprocess.Popen(
                argv, env=dict(env), stdout=out, stderr=subprocess.STDOUT, cwd=self.root
            )

    def stop(self) -> None:
        """Everything down and removed, whatever state the cluster is in."""
        if "slurmctld" in self._processes and self._processes["slurmctld"].poll() is None:
            with contextlib.suppress(SlurmError, subprocess.SubprocessError, OSError):
                self.cancel_all()
                self.wait_no_jobs(timeout_s=20.0)
        for name in ("slurmd", "slurmctld", "munged"):
            process = self._processes.pop(name, None)
            if process is not None:
                _end(process)
        _kill(self._helpers)
        self._end_job_processes()
        self._remove_cgroups()
        shutil.rmtree(self.root, ignore_errors=True)

    def _end_job_processes(self) -> None:
        """Processes still in the cluster's scope (a slurmstepd whose slurmd went first),
        ended by PID."""
        if self.scope.exists():
            _kill(
                [
                    process
                    for procs in self.scope.rglob("cgroup.procs")
                    for process in map(_identify, _read_pids(procs))
                    if process is not None
                ]
            )

    def _remove_cgroups(self) -> None:
        if self.scope.exists():
            directories = sorted(
                (p for p in self.scope.rglob("*") if p.is_dir()),
                key=lambda p: len(p.parts),
                reverse=True,
            )
            for directory in [*directories, self.scope]:
                with contextlib.suppress(OSError):  # not empty: leave it, never force
                    directory.rmdir()
        if self._made_system_slice:
            with contextlib.suppress(OSError):
                (self.cgroup_mount / "system.slice").rmdir()

    # --- clients ---

    def run(self, *argv: str, check: bool = True, timeout_s: float = 30.0) -> str:
        """A Slurm client command against this cluster; its stdout."""
        result = subprocess.run(
            argv, env=self.env(), capture_output=True, text=True, timeout=timeout_s
        )
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")
        return result.stdout

    def submit(
        self,
        script: str,
        *,
        time_limit: str = "5",
        gres: str | None = None,
        options: Sequence[str] = (),
    ) -> str:
        """`sbatch --parsable` of a script text (a shebang line is added when it has none);
        the job id. Output goes to the cluster's log directory."""
        if not script.startswith("#!"):
            script = "#!/bin/sh\n" + script
        argv = ["sbatch", "--parsable", f"--time={time_limit}", "--chdir", str(self.root),
                f"--output={self.root}/log/job-%j.out"]  # fmt: skip
        if gres:
            argv.append(f"--gres={gres}")
        argv.extend(options)
        result = subprocess.run(
            argv, input=script, env=self.env(), capture_output=True, text=True, timeout=30
        )
        if result.returncode != 0:
            raise SlurmError(f"sbatch: exit {result.returncode}: {result.stderr.strip()}")
        return result.stdout.strip().split(";")[0]

    def job_output(self, job_id: str) -> str:
        return (self.root / "log" / f"job-{job_id}.out").read_text()

    def job(self, job_id: str) -> Job:
        line = self.run("scontrol", "show", "job", "-o", job_id).strip()
        return Job(job_id, _parse_fields(line))

    def wait_job_state(
        self, job_id: str, states: str | Sequence[str], timeout_s: float = 30.0
    ) -> Job:
        """Waits until the job's state is one of `states` (JobState values: RUNNING,
        COMPLETED, PENDING, FAILED...). A job that ends in another state, or a timeout, raises
        with what the job showed."""
        wanted = {states} if isinstance(states, str) else set(states)
        return self.wait_job(
            job_id, lambda job: job.state in wanted, "/".join(sorted(wanted)), timeout_s
        )

    def wait_job(
        self, job_id: str, until: Callable[[Job], bool], what: str, timeout_s: float = 30.0
    ) -> Job:
        """Waits until `until(job)` holds; a job that ends first, or a timeout, raises with
        the job's state and reason and the tail of slurmd's log."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL",
                 "OUT_OF_MEMORY", "DEADLINE", "PREEMPTED"}  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if until(job):
                return job
            if job.state in final or time.monotonic() > deadline:
                raise SlurmError(
                    f"job {job_id}: {job.state} (Reason={job.fields.get('Reason')}), not {what};"
                    " slurmd log tail:\n"
                    + "\n".join(self.slurmd_log.read_text().splitlines()[-20:])
                )
            time.sleep(0.05)

    def node_state(self) -> str:
        line = self.run("scontrol", "show", "node", "-o", NODE_NAME).strip()
        return _parse_fields(line).get("State", "")

    def wait_node_idle(self, timeout_s: float = 30.0) -> None:
        """Waits for the node to be IDLE with no flag (not DRAIN, not still registering)."""
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            for name, process in self._processes.items():
                if process.poll() is not None:
                    log = self.root / "log" / f"{name}.out"
                    raise SlurmError(f"{name} exited {process.returncode}: {log.read_text()}")
            with contextlib.suppress(SlurmError, subprocess.TimeoutExpired):
                state = self.node_state()
                if state == "IDLE":
                    return
            time.sleep(0.1)
        raise SlurmError(f"node {NODE_NAME} is {state or 'unknown'}, not IDLE")

    def resume(self, timeout_s: float = 30.0) -> None:
        """Returns a drained (or down) node to service and waits until it is idle."""
        state = self.node_state()
        if any(flag in state for flag in ("DRAIN", "DOWN", "FAIL")):
            self.run("scontrol", "update", f"nodename={NODE_NAME}", "state=resume")
        self.wait_node_idle(timeout_s=timeout_s)

    def job_ids(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%i").split()

    def cancel_all(self) -> None:
        if self.job_ids():
            self.run("scancel", f"--partition={PARTITION}")

    def wait_no_jobs(self, timeout_s: float = 30.0) -> None:
        """Waits until squeue lists no job (cancelled and completing ones included)."""
        _wait_for(lambda: not self.job_ids(), timeout_s, "no job in squeue")

    def log_since(self, log: Path, offset: int) -> str:
        """What a daemon wrote to its log after `offset` bytes (see `log_offset`)."""
        with log.open("rb") as stream:
            stream.seek(offset)
            return stream.read().decode(errors="replace")

    @staticmethod
    def log_offset(log: Path) -> int:
        return log.stat().st_size if log.exists() else 0

    # --- hooks ---

    @contextlib.contextmanager
    def hooks(self, prolog: Path | None = None, epilog: Path | None = None) -> Iterator[None]:
        """Runs `prolog`/`epilog` (executables, run by slurmd as root with no PATH) as the
        cluster's Prolog/Epilog inside the block; back to none after it."""
        try:
            self.set_hooks(prolog=prolog, epilog=epilog)
            yield
        finally:
            self.set_hooks()

    def set_hooks(self, prolog: Path | None = None, epilog: Path | None = None) -> None:
        for name, script in (("prolog", prolog), ("epilog", epilog)):
            target = self.root / "hooks" / f"{name}.target"
            if script is None:
                target.unlink(missing_ok=True)
            else:
                tmp = target.with_suffix(".tmp")
                tmp.write_text(f"{script}\n")
                tmp.replace(target)

    def reset(self) -> None:
        """Between tests: no job, no hook, the node idle (resumed if a hook drained it)."""
        self.set_hooks()
        self.cancel_all()
        self.wait_no_jobs()
        self.resume()


def _parse_fields(line: str) -> dict[str, str]:
    """`Key=value` pairs of a `scontrol show ... -o` line (values have no spaces, except
    the last fields some records carry; good enough for the keys the tests read)."""
    return dict(m.groups() for m in re.finditer(r"(\w+(?::\w+)?)=(\S*)", line))


def _read_pids(procs: Path) -> list[int]:
    try:
        return [int(pid) for pid in procs.read_text().split()]
    except OSError:
        return []


def _identify(pid: int) -> tuple[int, str] | None:
    """A process as (PID, start time), so that a reused PID is never mistaken for it."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat_line.rpartition(")")[2].split()
    return None if fields[0] == "Z" else (pid, fields[19])


def _children(pid: int) -> list[tuple[int, str]]:
    children: list[tuple[int, str]] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                identity = _identify(int(child))
                if identity is not None:
                    children.append(identity)
    return children


def _kill(processes: Sequence[tuple[int, str]]) -> None:
    """SIGKILL to each process still alive, then waits until they are gone."""
    for pid, started in processes:
        if _identify(pid) == (pid, started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + STOP_GRACE_S
    while any(_identify(pid) == (pid, started) for pid, started in processes):
        if time.monotonic() > deadline:
            raise SlurmError(f"processes survive SIGKILL: {processes}")
        time.sleep(0.05)


def _end(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise SlurmError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.05)
