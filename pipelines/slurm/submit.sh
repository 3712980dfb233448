#!/usr/bin/env bash
# Submit the whole cohort run: extract array (SHARDS tasks, one GPU each) -> train + predict -> heatmap,
# each job starting only after the one before succeeded (--dependency=afterok).
#   bash submit.sh            # uses config.sh next to this script
#   bash submit.sh my.sh      # another config file
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
export WSI_MIL_CONFIG="$(cd "$(dirname "${1:-$HERE/config.sh}")" && pwd)/$(basename "${1:-$HERE/config.sh}")"
source "$WSI_MIL_CONFIG"
mkdir -p "$OUT"
extract=$(sbatch --parsable --array="0-$((SHARDS - 1))" --export="ALL,WSI_MIL_SHARDS=$SHARDS" \
  "$HERE/extract.sbatch")
extract=${extract%%;*}
train=$(sbatch --parsable --dependency="afterok:$extract" --export=ALL "$HERE/train.sbatch")
train=${train%%;*}
heatmap=$(sbatch --parsable --dependency="afterok:$train" --export=ALL "$HERE/heatmap.sbatch")
heatmap=${heatmap%%;*}
echo "submitted: extract $extract (array 0-$((SHARDS - 1))), train $train, heatmap $heatmap"
echo "follow: squeue -u $USER; results: $OUT/train/metrics.json, $OUT/heatmaps/index.html"
