#!/usr/bin/env bash
# One prepared GPU session: every benchmark, then every quantizer's bf16 smoke run on CUDA, within
# about 9 minutes (each part has its own time limit, so one slow part cannot starve the others).
# Run from the repository root on a CUDA machine; no MLflow needed (tracking is off throughout).
# The device lacks the peer, lpips and torch-fidelity: carry the wheels pinned in
# benchmarks/gpu_wheels.txt (480 KB, pure Python), fetched here with
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl -r benchmarks/gpu_wheels.txt
# and run there (carry .whl) as
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site && bash benchmarks/gpu_session.sh
# Results: ${OUT:-runs}/bench/, five JSON files (quantizers, kmeans and train_step rewritten as
# each row finishes, so a part cut by its limit keeps its rows) and log.txt with every table: six
# files, within the eight the device returns.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-runs}/bench"
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
quiet() { grep -v -E "it/s\]|s/it\]"; }  # progress bars stay out of the log
part() { echo; echo "## $1 ($(date +%T), limit $2 s)"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

part "quantizers beside the peer" 150
timeout 150 python3 benchmarks/quantizers.py --out "$out/quantizers.json" 2>&1 | quiet

part "k-means init" 90
timeout 90 python3 benchmarks/kmeans.py --out "$out/kmeans.json" 2>&1 | quiet

part "training step" 240
variants=("fp32" "bf16" "bf16 + lpips" "bf16 torchrun x1" "bf16 loader" "bf16 compile" "bf16 compile + lpips")
timeout 240 python3 benchmarks/train_step.py --steps 150 --compile --variants "${variants[@]}" \
  --out "$out/train_step.json" 2>/dev/null

part "loader" 40
step_rate=$(python3 -c "import json; r=json.load(open('$out/train_step.json'))['results']; print(max(x.get('images_per_s', 0) for x in r))" 2>/dev/null || echo 4000)
timeout 40 python3 benchmarks/data.py --count 1024 --batches 10 --step-rate "$step_rate" --out "$out/data.json" 2>&1 | quiet

part "validation pass" 40
timeout 40 python3 benchmarks/evaluate.py --out "$out/evaluate.json" 2>&1 | quiet

part "every quantizer, bf16 smoke run on CUDA" 50
timeout 50 python3 - <<'EOF'
import vqlab

for name in vqlab.quantizers.available():
    overrides = {"quantizer.name": name, "train.device": "cuda", "train.dtype": "bf16", "train.steps": 40}
    overrides |= {"tracking.mlflow": False, "tracking.root": "/tmp/cuda-smoke", "tracking.run_name": name}
    try:
        result = vqlab.fit(vqlab.config.load("smoke", overrides))
        print(f"[{name}] val/l1 {result.metrics['val/l1']:.4f}")
    except Exception as err:  # one quantizer's failure is a line of the log, not the end of the session
        print(f"[{name}] FAILED {type(err).__name__}: {str(err).splitlines()[0][:200]}")
EOF
echo; echo "## done $(date +%T)"
