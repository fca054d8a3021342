#!/usr/bin/env bash
# The GPU side-by-side run, as one prepared script (see docs/performance.md).
#
#   bash bench/gpu_run.sh                      # config gpu   -> bench/results/gpu.json, gpu.log
#   bash bench/gpu_run.sh --config gpu-large   # config gpu-large -> bench/results/gpu-large.json (its own file)
#
# on the GPU machine, from the repository root, with .whl/ carried along. The tree is copied there without .git:
# set INFLUENCE_AUDIT_COMMIT (e.g. to `git rev-parse --short HEAD` taken here) so the result records the commit.
#
# The GPU machine has torch, transformers, safetensors and numpy but not kronfluence: kronfluence 1.0.1 and
# the pure-Python packages it imports come as wheels in .whl/ (prepared on a machine with PyPI access by
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform any -d .whl \
#       kronfluence==1.0.1 einconv==0.1.0 accelerate==1.15.0 einops==0.8.2 opt_einsum==3.4.0
# ) and are unpacked into /tmp/kf without touching the machine's own packages (never torchvision).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
mkdir -p "$OUT"
rm -rf /tmp/kf
if ! "$PY" -m pip install --quiet --no-index --no-deps --target /tmp/kf .whl/*.whl; then
  rm -rf /tmp/kf  # no pip: wheels of pure-Python packages are zip files
  for w in .whl/*.whl; do "$PY" -m zipfile -e "$w" /tmp/kf; done
fi
export PYTHONPATH="/tmp/kf:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import kronfluence, torch; print('kronfluence', kronfluence.__version__, 'torch', torch.__version__, \
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
CONFIG=gpu
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do  # the last --config wins, as in argparse; it names the output files
  case "${args[i]}" in
    --config) CONFIG="${args[i + 1]:-gpu}" ;;
    --config=*) CONFIG="${args[i]#--config=}" ;;
  esac
done
"$PY" bench/bench_kronfluence.py --config gpu "$@" --out "$OUT/$CONFIG.json" 2>&1 | tee "$OUT/$CONFIG.log"
