# Paths and sizes of one cohort run; copy this folder, edit this file, then `bash submit.sh`.
# Paths must be visible from every node (a shared file system).
SLIDES=/shared/cohort/slides           # folder (searched recursively), glob or CSV with a 'path' column
LABELS=/shared/cohort/labels.csv       # slide_id,label[,case_id]
OUT=/shared/wsi-mil/run1               # extract/, train/, predict/, heatmaps/ are written here
SHARDS=8                               # extract array tasks = GPUs used at once (one shard each)
# How to call wsi-mil on a node: a virtual environment's command, or the Docker image via Apptainer:
#   WSI_MIL="apptainer exec --nv --bind /shared docker://registry.example.org/wsi-mil:0.1.0 wsi-mil"
WSI_MIL=wsi-mil
EXTRACT_ARGS="--device cuda"           # e.g. --encoder resnet50_trunc --weights /shared/models/r50.safetensors
TRAIN_ARGS="--device cuda"             # e.g. --config /shared/wsi-mil/train.yaml
