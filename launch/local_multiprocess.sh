#!/usr/bin/env bash
# Run N_PROC local processes of one command, each with DEVICES_PER_PROC simulated CPU devices, joined by
# jax.distributed through a coordinator on 127.0.0.1 (rlhf_jax.runtime.distributed reads the RLHF_JAX_* variables).
#
#   bash launch/local_multiprocess.sh 2 4 -- python -m rlhf_jax.cli sft configs/tiny_sft.yaml
#
# Output lines are prefixed [pI]. If a process fails, the others get RLHF_JAX_GRACE_S (default 60 s) to exit
# on their own (their watchdogs name the failed peer), then are killed; the whole run is bounded by
# RLHF_JAX_LAUNCH_TIMEOUT_S (default 3600 s). Exit status: 0, or the first failing process's status.
set -euo pipefail
usage() { echo "usage: $0 N_PROC DEVICES_PER_PROC -- COMMAND [ARGS...]" >&2; exit 2; }
[ $# -ge 4 ] || usage
N="$1"; DEV="$2"; shift 2
[ "$1" = "--" ] || usage
shift
[[ "$N" =~ ^[1-9][0-9]*$ && "$DEV" =~ ^[1-9][0-9]*$ ]] || usage
TIMEOUT="${RLHF_JAX_LAUNCH_TIMEOUT_S:-3600}"
GRACE="${RLHF_JAX_GRACE_S:-60}"
PY="${PYTHON:-python3}"
PORT="${RLHF_JAX_PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

pids=()
for ((i = 0; i < N; i++)); do
  RLHF_JAX_COORDINATOR="127.0.0.1:$PORT" RLHF_JAX_NUM_PROCESSES="$N" RLHF_JAX_PROCESS_ID="$i" \
  RLHF_JAX_LOCAL_DEVICE_COUNT="$DEV" JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" \
    timeout --kill-after=10 "$TIMEOUT" "$@" \
    > >(sed -u "s/^/[p$i] /") 2> >(sed -u "s/^/[p$i] /" >&2) &
  pids+=("$!")
done

codes=()
first_fail=""
deadline=""
while :; do
  running=0
  for ((i = 0; i < N; i++)); do
    [ -n "${codes[$i]:-}" ] && continue
    if kill -0 "${pids[$i]}" 2>/dev/null; then running=$((running + 1)); continue; fi
    rc=0; wait "${pids[$i]}" || rc=$?
    codes[$i]="$rc"
    if [ "$rc" -ne 0 ] && [ -z "$first_fail" ]; then
      first_fail="$i"; deadline=$((SECONDS + GRACE))
      echo "[launch] process $i exited with status $rc; waiting up to ${GRACE}s for the others" >&2
    fi
  done
  [ "$running" -eq 0 ] && break
  if [ -n "$deadline" ] && [ "$SECONDS" -ge "$deadline" ]; then
    for ((i = 0; i < N; i++)); do
      if [ -z "${codes[$i]:-}" ]; then
        echo "[launch] process $i still running ${GRACE}s after process $first_fail failed; killing it" >&2
        kill -TERM "${pids[$i]}" 2>/dev/null || true
      fi
    done
    deadline=""
  fi
  sleep 0.5
done
sleep 0.2  # let the output prefixers flush
summary=""
for ((i = 0; i < N; i++)); do summary+=" p$i=${codes[$i]}"; done
echo "[launch] exit statuses:$summary" >&2
[ -z "$first_fail" ] && exit 0
exit "${codes[$first_fail]}"
