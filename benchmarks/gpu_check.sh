#!/usr/bin/env bash
# One command for a GPU host: where rnngen runs, whether CUDA gives the CPU's text, whether the
# CUDA graph path is active, the decode benchmark's device lines and the serve benchmark. Finishes in
# under 9 minutes.
#
# On the lent GPU machine (see ../shared/gpu/README.md), from the checkout:
#   source .ortgpu/activate.sh || exit 1; bash benchmarks/gpu_check.sh
# Anywhere else: python3 with rnngen's runtime dependencies (torch too, for the benchmark lines);
# rnngen runs from this checkout through PYTHONPATH (python3 -m rnngen), no install needed.
# PYTHON names another interpreter (default python3).
#
#   --cpu-only   run only the CPU parts (also what happens, with a note, where CUDA is not usable)
#   --smoke      a small subset: the shipped LSTM only, short texts, no benchmark (a test runs this)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cpu_only=0 smoke=0
for arg in "$@"; do
  case "$arg" in
    --cpu-only) cpu_only=1 ;;
    --smoke) smoke=1 ;;
    *) echo "gpu_check.sh: unknown option $arg (allowed: --cpu-only, --smoke)" >&2; exit 2 ;;
  esac
done
models=(lstm gru rnn) tokens=300 steps=200 engine_reserve=110
if [ "$smoke" = 1 ]; then models=(lstm) tokens=40 steps=20; fi
start=$SECONDS deadline=530  # seconds: every step's timeout is cut to what is left of this

left() {  # seconds a step may take: its own limit, cut to the time left before the deadline
  local want=$1 rest=$((deadline - (SECONDS - start) - ${2:-0}))
  if [ "$rest" -lt "$want" ]; then want=$rest; fi
  if [ "$want" -lt 5 ]; then want=5; fi
  echo "$want"
}

echo "== providers"
if ! providers=$(timeout 60 "$PY" benchmarks/gpu_check.py providers 2>&1); then
  echo "$PY cannot run rnngen's runtime (onnxruntime, onnx, numpy): source .ortgpu/activate.sh, or set PYTHON to a" \
       "Python that has them" >&2
  exit 1
fi
echo "$providers"
device=cuda
if [ "$cpu_only" = 1 ]; then
  device=cpu; echo "CUDA: not checked (--cpu-only); running the CPU parts"
elif ! grep -q "^CUDA: usable" <<<"$providers"; then
  device=cpu; echo "CUDA is not available here: running the CPU parts only"
fi

generate() {  # model, device, extra options...
  local model=$1 dev=$2; shift 2
  timeout "$(left 90 "$engine_reserve")" "$PY" -m rnngen generate -m "exported/$model.onnx" -p "ROMEO:" -n "$tokens" --device "$dev" -q "$@" 2>&1
}

echo "== text: CUDA vs CPU ($tokens tokens after \"ROMEO:\")"
for m in "${models[@]}"; do
  for mode in greedy seeded; do
    if [ "$mode" = greedy ]; then opts=(-t 0); else opts=(-t 0.8 --seed 7); fi
    cpu_text=$(generate "$m" cpu "${opts[@]}")
    if [ "$device" = cuda ]; then
      cuda_text=$(generate "$m" cuda "${opts[@]}")
      if [ "$cuda_text" = "$cpu_text" ]; then verdict="identical"; else verdict="DIFFERENT"; fi
      echo "$m $mode: CUDA vs CPU text $verdict"
      [ "$verdict" = DIFFERENT ] && printf '  cpu:  %q\n  cuda: %q\n' "${cpu_text:0:160}" "${cuda_text:0:160}"
    else
      echo "$m $mode: CPU text (CUDA not run): $(printf '%q' "${cpu_text:0:80}")"
    fi
  done
done

echo "== device paths: fused prefill, CUDA graph stepper"
for m in "${models[@]}"; do
  timeout "$(left 90 "$engine_reserve")" "$PY" benchmarks/gpu_check.py paths "exported/$m.onnx" --device "$device" --steps "$steps" 2>&1
done

if [ "$smoke" = 0 ]; then
  echo "== benchmark: device paths (benchmarks/decode.py --device $device --only device)"
  if [ "$device" = cuda ]; then batches=1,1024 streams=64,256,1024; else batches=1,64 streams=8,64; fi
  limit=$(left 240 "$engine_reserve")
  timeout "$limit" "$PY" benchmarks/decode.py --device "$device" --batches "$batches" --only device --quick 2>&1 \
    || echo "(device benchmark stopped: exit $?, limit ${limit}s)"
  echo "== benchmark: serving (benchmarks/serve.py --device $device --streams $streams --tokens 200)"
  limit=$(left 150 "$engine_reserve")
  timeout "$limit" "$PY" benchmarks/serve.py --device "$device" --streams "$streams" --tokens 200 2>&1 \
    || echo "(serve benchmark stopped: exit $?, limit ${limit}s)"
  echo "== benchmark: engine (benchmarks/decode.py --device $device --only speed --quick)"
  limit=$(left "$engine_reserve")
  timeout "$limit" "$PY" benchmarks/decode.py --device "$device" --batches "$batches" --only speed --quick 2>&1 \
    || echo "(engine benchmark stopped: exit $?, limit ${limit}s)"
fi
echo "== gpu_check done in $((SECONDS - start)) s (device $device)"
