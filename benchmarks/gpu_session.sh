#!/usr/bin/env bash
# One prepared GPU session (run from the repository root on a CUDA machine with the source tree on
# PYTHONPATH; no MLflow needed): every quantizer's smoke run in bf16 on CUDA, then every benchmark.
# The machine lacks vector-quantize-pytorch, lpips and torch-fidelity: carry their wheels (and
# einops, einx, loguru, torch-einops-utils, frozendict) in .whl/ and install them to /tmp/site first
# (the device tool's README shows how). Results go to ${OUT:-runs}/bench/.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-runs}/bench"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
for q in $(python3 -c "import vqlab; print(' '.join(vqlab.quantizers.available()))"); do
  python3 -m vqlab.train --config smoke quantizer.name="$q" train.device=cuda train.dtype=bf16 tracking.mlflow=false \
    train.steps=60 tracking.root="$out/cuda-smoke" 2>&1 | grep -E "^(final|step 60:)|Error" | sed "s/^/[$q] /" | cut -c1-220
done
python3 benchmarks/quantizers.py --out "$out/quantizers.json" 2>&1 | grep -v "^quantizers:"
python3 benchmarks/train_step.py --steps 150 --compile --out "$out/train_step.json" 2>/dev/null
step_rate=$(python3 -c "import json; r=json.load(open('$out/train_step.json'))['results']; print(max(x.get('images_per_s', 0) for x in r))")
python3 benchmarks/data.py --count 2048 --step-rate "$step_rate" --out "$out/data.json"
python3 benchmarks/evaluate.py --out "$out/evaluate.json"
