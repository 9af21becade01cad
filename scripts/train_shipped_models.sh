#!/usr/bin/env bash
# Trains, exports and scores the models shipped in exported/ (the exact recipe in exported/README.md).
# Usage: bash scripts/train_shipped_models.sh [CORPUS] [RUNS_DIR] [lstm gru rnn]   (needs the train extra)
set -euo pipefail
corpus=${1:-../shared/data/tinyshakespeare.txt}
runs=${2:-runs}
shift $(( $# > 2 ? 2 : $# ))
models=${*:-lstm gru rnn}
mkdir -p "$runs" exported
# The validation split: the last 10% of the corpus, as training holds it out.
python - "$corpus" "$runs/val.txt" <<'PY'
import sys
text = open(sys.argv[1], encoding="utf-8").read()
open(sys.argv[2], "w", encoding="utf-8").write(text[int(len(text) * 0.9):])
PY
train() {  # name, then rnngen train options
  local name=$1; shift
  /usr/bin/time -f "$name: %e s wall" rnngen train "$corpus" --out "$runs/$name" --force --threads 2 "$@"
  rnngen export "$runs/$name" -o "exported/$name.onnx" --force
  rnngen score "exported/$name.onnx" "$runs/val.txt"
}
for name in $models; do
  case $name in
    lstm) train lstm --cell lstm --layers 2 --hidden 384 --dropout 0.25 --steps 4000 --batch-size 32 --seq-len 128 --lr 2e-3 ;;
    gru) train gru --cell gru --layers 2 --hidden 320 --dropout 0.2 --steps 3000 --batch-size 32 --seq-len 128 --lr 2e-3 ;;
    rnn) train rnn --cell rnn --layers 2 --hidden 512 --dropout 0.1 --steps 3000 --batch-size 32 --seq-len 128 --lr 1e-3 ;;
    *) echo "unknown model $name (lstm, gru, rnn)" >&2; exit 2 ;;
  esac
done
