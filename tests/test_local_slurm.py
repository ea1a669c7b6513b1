"""The local one-node Slurm (scripts/local-slurm) runs batch jobs and enforces memory."""

from __future__ import annotations

import subprocess


def test_sbatch_wait_runs_a_job_on_the_local_node(local_slurm, tmp_path):
    output = tmp_path / "job-%j.out"
    result = subprocess.run(
        [
            "sbatch",
            "--wait",
            "--parsable",
            f"--output={output}",
            "--wrap",
            "echo ran $SLURM_JOB_ID",
        ],
        capture_output=True,
        text=True,
        env=local_slurm.environ(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().split(";")[0]
    written = tmp_path / f"job-{job_id}.out"
    assert written.read_text().strip() == f"ran {job_id}"


def test_job_asking_more_memory_than_the_node_has_is_refused(local_slurm):
    result = subprocess.run(
        ["sbatch", f"--mem={local_slurm.memory_mb + 1024}M", "--wrap", "true"],
        capture_output=True,
        text=True,
        env=local_slurm.environ(),
        timeout=60,
    )
    assert result.returncode != 0
    assert "Memory specification can not be satisfied" in result.stderr
