"""Writing job files as the Slurm prolog does (docs/slurm.md), for the tests."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def job_document(job_id: str, **fields: Any) -> dict[str, Any]:
    """A job file's content: version 1, slurm, an hour's lease; `fields` replace keys
    (None removes one)."""
    document: dict[str, Any] = {
        "version": 1,
        "scheduler": "slurm",
        "job_id": job_id,
        "user": "alice",
        "gpus": [],
        "expires_at": time.time() + 3600,
        "lease": "time limit 00:30:00 (squeue) + 1800s margin",
    }
    document.update(fields)
    return {key: value for key, value in document.items() if value is not None}


def write_job(directory: Path, job_id: str, **fields: Any) -> Path:
    """Write job `job_id`'s file atomically (a dotfile renamed into place)."""
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    path = directory / f"slurm-job-{job_id}.json"
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(job_document(job_id, **fields)))
    tmp.rename(path)
    return path


def qos(cgroup: str, policy: str = "node", class_name: str = "collectives") -> dict[str, str]:
    return {"policy": policy, "className": class_name, "cgroup": cgroup}
