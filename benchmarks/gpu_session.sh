#!/usr/bin/env bash
# One prepared GPU session (run from the repository root on a CUDA machine, source tree on
# PYTHONPATH, no MLflow/LPIPS needed): every quantizer's smoke run in bf16 on CUDA, then the
# throughput table. Results go to ${OUT:-runs}/.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-runs}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
for q in $(python3 -c "import vqlab; print(' '.join(vqlab.quantizers.available()))"); do
  python3 -m vqlab.train --config smoke quantizer.name="$q" train.device=cuda train.dtype=bf16 \
    train.steps=60 tracking.root="$out/cuda-smoke" 2>&1 | grep -E "^(final|step 60:)|Error" | sed "s/^/[$q] /" | cut -c1-220
done
python3 benchmarks/throughput.py --steps 150 --compile --out "$out/throughput.json"
