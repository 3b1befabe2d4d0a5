#!/usr/bin/env bash
# Every GPU measurement the project has, in one run, for the day a GPU machine is lent (under 8 minutes
# on one GPU in the full form; see benchmarks/README.md):
#   1. inference against the MONAI pipeline     (benchmarks/inference.py)
#   2. inference against nnU-Net's predictor     (benchmarks/nnunet_baseline.py, 3 mm; the quick form 6 mm)
#   3. training throughput against MONAI's loop  (benchmarks/training.py)
#   4. TTA: segment with and without --tta on the same volume (benchmarks/tta.py)
#   5. the out-of-memory fallback (Testing/test_inference.py: smaller batches, then the CPU, then a clear error)
#   6. inference against MONAI's bundle inference (benchmarks/monai_bundle_baseline.py, wholeBody's SegResNet, 3 mm)
#
#   benchmarks/gpu-check.sh [--device cuda|cpu] [--quick] [--out DIR]
#
# --quick runs the tiny sizes (the CPU smoke form: benchmarks/gpu-check.sh --device cpu --quick). Each
# step's JSON report and log go to DIR (default benchmarks/results/gpu-check-DATE); a failed step is
# reported and the others still run; the exit status is 1 when any step failed.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
device=cuda
quick=0
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="${2:?--device needs cuda or cpu}"; shift 2 ;;
    --quick) quick=1; shift ;;
    --out) out="${2:?--out needs a folder}"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$device" in cuda|cpu) ;; *) echo "gpu-check.sh: --device must be cuda or cpu, not $device" >&2; exit 2 ;; esac
out="${out:-$root/benchmarks/results/gpu-check-$(date +%Y%m%d-%H%M)}"
mkdir -p "$out"
if [ "$quick" = 1 ]; then size=tiny; repeats=1; nnunet=(--quick); monai=(--quick)
else size=full; repeats=2; nnunet=(--spacing 3); monai=(--spacing 3); fi
export PYTHONPATH="$root/MedSegUNet:$root${PYTHONPATH:+:$PYTHONPATH}"
failed=0

step() {  # step NAME COMMAND...: run, time, log to $out/NAME.log
  local name="$1"; shift
  local start=$SECONDS
  echo "== $name: $*" >&2
  if "$@" > "$out/$name.log" 2>&1; then
    echo "   $name: ok in $((SECONDS - start)) s" >&2
  else
    echo "   $name: FAILED after $((SECONDS - start)) s (see $out/$name.log)" >&2
    tail -5 "$out/$name.log" >&2
    failed=1
  fi
}

"$python" -m MedSegUNetLib devices > "$out/devices.json"
step inference "$python" "$root/benchmarks/inference.py" --size "$size" --repeats "$repeats" --device "$device" \
  --json "$out/inference.json"
step nnunet "$python" "$root/benchmarks/nnunet_baseline.py" "${nnunet[@]}" --device "$device" --json "$out/nnunet.json"
step training "$python" "$root/benchmarks/training.py" --size "$size" --repeats 1 --device "$device" \
  --json "$out/training.json"

step tta "$python" "$root/benchmarks/tta.py" --size "$size" --device "$device" --json "$out/tta.json"
step monai-bundle "$python" "$root/benchmarks/monai_bundle_baseline.py" "${monai[@]}" --device "$device" \
  --json "$out/monai-bundle.json"
step oom-fallback "$python" -m pytest -q -p no:cacheprovider "$root/Testing/test_inference.py" -k "out_of_memory"

echo "reports in $out" >&2
exit "$failed"
