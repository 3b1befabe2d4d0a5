#!/usr/bin/env bash
# Rebuilds Resources/Models/abdomen-ct.safetensors, the shipped model, with this project's own tools:
# the training scan of `medsegunet sample-data` (TotalSegmentator's example CT; its reference masks were
# produced by TotalSegmentator), six large abdominal structures, a fixed step budget and seed.
# The held-out scan (heldout-ct, another patient) is never trained on; `medsegunet demo` reports on it.
# About 25 minutes on 2 idle CPU cores. Usage: Resources/Models/build-abdomen-ct.sh [WORKDIR]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
work="${1:-$root/build/abdomen-ct}"
"$root/bin/medsegunet" sample-data --output "$work/samples" --only abdomen-ct
"$root/bin/medsegunet" train "$work/samples/abdomen-ct.mrb" -o "$work/abdomen-ct" \
  --labels liver,spleen,kidney_left,kidney_right,stomach,aorta \
  --patch-size 96 96 48 --filters 8 --batch-size 2 --lr 0.002 --max-steps 700 --validate-every 100 --seed 0 --device cpu
cp "$work/abdomen-ct/model.safetensors" "$root/Resources/Models/abdomen-ct.safetensors"
cp "$work/abdomen-ct/learning_curve.png" "$root/Resources/Models/abdomen-ct-learning-curve.png"
"$root/bin/medsegunet" info "$root/Resources/Models/abdomen-ct.safetensors"
