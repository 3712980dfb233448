#!/usr/bin/env bash
# Run the three Jobs in order, each after the one before completed:
#   bash run.sh [NAMESPACE]
# Prerequisites: PVCs wsi-mil-slides (the slides) and wsi-mil-out (ReadWriteMany), the ConfigMap
# wsi-mil-labels (kubectl create configmap wsi-mil-labels --from-file=labels.csv), the image pushed.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
NS=(--namespace "${1:-default}")
for stage in extract train heatmap; do
  kubectl "${NS[@]}" delete job "wsi-mil-$stage" --ignore-not-found
  kubectl "${NS[@]}" apply -f "$HERE/$stage-job.yaml"
  kubectl "${NS[@]}" wait --for=condition=complete --timeout=48h "job/wsi-mil-$stage"
done
echo "done: the review page is heatmaps/index.html on the wsi-mil-out volume"
