#!/bin/bash
# One dataset on many nodes: run on the cluster's login node (not with sbatch).
# `ingest --array` plans the units, writes the plan into --results-dir (on the
# shared file system) and submits 64 array tasks and a finishing job with sbatch;
# it prints their job ids and returns. After a failed, cancelled or timed-out
# task, run this script again: only the unfinished units are submitted.
set -euo pipefail

export SWIFT_SETTINGS=../.os_settings
PARAMS='{"voxel_size": [20, 20, 20], "voxel_unit": "um"}'

ingest \
    --source https://object.cscs.ch/v1/AUTH_61499a61052f419abad475045aaf88f9/img-svc-bigbrain-input \
    --download-dir source --results-dir results --stacks \
    --filter 'data/raw/original/pm31\d{2}o.png' \
    --parameters "$PARAMS" --container test_wrapper2 --cleanup \
    --jobs 16 --memory-limit 24G \
    --array 64 \
    --sbatch-option=--account="${SLURM_ACCOUNT:-ich001}" \
    --sbatch-option=--partition=normal \
    --sbatch-option=--cpus-per-task=16 \
    --sbatch-option=--time=01:00:00 \
    --sbatch-option=--signal=B:TERM@120
