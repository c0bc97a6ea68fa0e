#!/usr/bin/env bash
# The main job: a tiny end-to-end RLHF run on CPU (offline tokenizer + model, SFT -> RM -> PPO).
# Usage: bash launch/demo.sh [OUT_DIR] [--quick]   (default OUT_DIR: runs/demo)
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec python -m rlhf_jax demo "$@"
