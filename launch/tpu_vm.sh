#!/usr/bin/env bash
# Runs one ease-jax training command on every worker of a TPU VM slice.
#
#   launch/tpu_vm.sh NAME ZONE [--setup] -- --config configs/qwen2.5-0.5b_phase1.yaml [key=value ...]
#
# Every worker runs the same `python launch/train.py ...`; on a TPU VM, train.py
# calls jax.distributed.initialize() itself (the TPU environment names the
# coordinator), so no per-worker flags are needed. With --setup, each worker
# first clones (or updates) the repository and installs it with `pip install -e ".[tpu]"`.
#
# Environment:
#   EASE_REPO     git URL to clone           (default: this checkout's `origin`)
#   EASE_REF      branch / tag / commit      (default: main)
#   EASE_DIR      checkout path on workers   (default: ~/ease-jax)
#   EASE_PROJECT  gcloud --project           (default: gcloud's configured project)
#   EASE_LOG      log file on each worker    (default: ~/ease-jax-train.log)
#
# run_dir must be storage every worker can reach for checkpoints (a gs:// bucket
# path, or an NFS/Filestore mount): Orbax writes one checkpoint from all hosts.
set -euo pipefail

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 2 ]] || usage
NAME=$1 ZONE=$2; shift 2
SETUP=0
while [[ $# -gt 0 && $1 != "--" ]]; do
  case $1 in
    --setup) SETUP=1; shift ;;
    *) echo "error: unknown option $1" >&2; usage ;;
  esac
done
[[ ${1:-} == "--" ]] && shift
[[ $# -gt 0 ]] || { echo "error: give the train.py arguments after --" >&2; usage; }

REPO=${EASE_REPO:-$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || true)}
REF=${EASE_REF:-main}
DIR=${EASE_DIR:-'~/ease-jax'}
LOG=${EASE_LOG:-'~/ease-jax-train.log'}
PROJECT_FLAG=()
[[ -n ${EASE_PROJECT:-} ]] && PROJECT_FLAG=(--project "$EASE_PROJECT")

ARGS=$(printf ' %q' "$@")
SETUP_CMD=""
if [[ $SETUP == 1 ]]; then
  [[ -n $REPO ]] || { echo "error: set EASE_REPO to the git URL to clone" >&2; exit 2; }
  SETUP_CMD="set -e; if [ -d $DIR/.git ]; then git -C $DIR fetch -q origin && git -C $DIR checkout -q $REF && git -C $DIR pull -q --ff-only || true; else git clone -q $REPO $DIR && git -C $DIR checkout -q $REF; fi; cd $DIR && python3 -m pip install -q -U -e '.[tpu]';"
fi
# nohup + log file: the run survives the ssh session ending; tail the log to watch it.
RUN_CMD="cd $DIR && nohup python3 launch/train.py$ARGS > $LOG 2>&1 &"

echo "workers of $NAME ($ZONE): ${SETUP_CMD:+setup, then }python3 launch/train.py$ARGS"
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all \
  --command "$SETUP_CMD $RUN_CMD"
echo "started; follow worker 0 with:"
echo "  gcloud compute tpus tpu-vm ssh $NAME --zone $ZONE --worker=0 --command 'tail -f $LOG'"
