#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM pod slice, from a workstation with gcloud.
#
#   bash launch/tpu_pod.sh TPU_NAME ZONE [--project P] -- rlhf-jax ppo configs/pod_ppo.yaml
#
# 1. copies this checkout (git-tracked files) to ~/rlhf_jax on all workers (gcloud ... scp --worker=all),
# 2. creates/reuses a venv there with rlhf_jax[tpu] pinned by constraints.txt (launch/_venv.sh),
# 3. runs the command on all workers at once with RLHF_JAX_DISTRIBUTED=auto, so rlhf_jax.runtime.distributed
#    calls jax.distributed.initialize() with no arguments (TPU auto-detection of coordinator and ids).
# Bounded: RLHF_JAX_LAUNCH_TIMEOUT_S (default 86400 s) per worker; a dead worker stops the others through
# jax.distributed's heartbeat (RLHF_JAX_HEARTBEAT_TIMEOUT_S, default 100 s) and the step watchdogs.
set -euo pipefail
usage() { echo "usage: $0 TPU_NAME ZONE [--project PROJECT] -- COMMAND [ARGS...]" >&2; exit 2; }
[ $# -ge 4 ] || usage
TPU="$1"; ZONE="$2"; shift 2
GC=(gcloud compute tpus tpu-vm)
FLAGS=(--zone "$ZONE")
if [ "$1" = "--project" ]; then FLAGS+=(--project "$2"); shift 2; fi
[ "${1:-}" = "--" ] || usage
shift
[ $# -ge 1 ] || usage
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TIMEOUT="${RLHF_JAX_LAUNCH_TIMEOUT_S:-86400}"
HB="${RLHF_JAX_HEARTBEAT_TIMEOUT_S:-100}"
command -v gcloud >/dev/null || { echo "gcloud not found: install the Google Cloud SDK" >&2; exit 2; }

TARBALL="$(mktemp -t rlhf_jax_src.XXXXXX.tar.gz)"
trap 'rm -f "$TARBALL"' EXIT
git -C "$ROOT" ls-files -z | tar -C "$ROOT" --null -T - -czf "$TARBALL"
echo "[tpu_pod] copying $(du -h "$TARBALL" | cut -f1) to all workers of $TPU"
timeout 600 "${GC[@]}" scp "$TARBALL" "$TPU:/tmp/rlhf_jax_src.tar.gz" --worker=all "${FLAGS[@]}"

printf -v CMD '%q ' "$@"
REMOTE="set -euo pipefail
mkdir -p ~/rlhf_jax && tar -xzf /tmp/rlhf_jax_src.tar.gz -C ~/rlhf_jax && cd ~/rlhf_jax
export RLHF_JAX_EXTRAS=tpu RLHF_JAX_DISTRIBUTED=auto RLHF_JAX_HEARTBEAT_TIMEOUT_S=$HB
source launch/_venv.sh
timeout --kill-after=30 $TIMEOUT $CMD"
echo "[tpu_pod] running on all workers: $CMD"
exec timeout --kill-after=60 "$((TIMEOUT + 1800))" "${GC[@]}" ssh "$TPU" --worker=all "${FLAGS[@]}" --command "$REMOTE"
