#!/usr/bin/env bash
# Every check that needs an accelerator, one line each, within about 8 minutes on one GPU, then the first-batch
# benchmark on the GPU (benchmarks/first_batch.py, a few minutes more):
#   bash tests/gpu/run.sh            (installs the test extra into the active Python when fam_hf is missing)
#   bash tests/gpu/run.sh bf16 sft   (a subset)
set -euo pipefail
cd "$(dirname "$0")/../.."
python -c "import fam_hf, deepspeed, trl" 2>/dev/null || python -m pip install --quiet -e ".[dev]"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
PYTHONPATH="$PWD" python tests/gpu/checks.py "$@"
# the whole run's first batch on the GPU (issue 25): peak torch.cuda.max_memory_allocated, first and steady step
if [ "$#" -eq 0 ]; then
  python benchmarks/first_batch.py --device cuda --shapes smollm2-2x512 smollm2-4x1024 vocab128k-1x4096 \
    --out "${OUT:-benchmarks/results}/first_batch_gpu.json"
fi
