#!/usr/bin/env bash
# Slurm array job: one shard of the cohort per task, all tasks share one output folder.
#   sbatch --array=0-7 pipelines/slurm_extract.sh /data/slides /data/out/extract
#SBATCH --job-name=wsi-mil-extract
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --requeue
set -euo pipefail
SLIDES=${1:?slide folder}
OUT=${2:?output folder}
export HDF5_USE_FILE_LOCKING=FALSE   # shared file systems often refuse HDF5's locks
# The shard comes from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT; a requeued task resumes.
exec wsi-mil extract "$SLIDES" --out "$OUT" --device auto
