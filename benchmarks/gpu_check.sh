#!/usr/bin/env bash
# The GPU check for speculative decoding and the offload planner, for a lent GPU machine (the
# `device` tool), at most 8 minutes there.  Not run in CI and never needed by the tests.
#
# Prepare here (the device machine reaches no network):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --no-binary llama-cpp-python -d .whl 'llama-cpp-python==0.3.36'
#   python3 -m pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .whl numpy gguf sentencepiece click jinja2 markupsafe tqdm threadpoolctl cryptography cffi \
#       pycparser rapidfuzz pyserial typing-extensions diskcache pyyaml requests
# then:  run(command="bash benchmarks/gpu_check.sh", timeout_s=540)
#
# It builds llama-cpp-python with CUDA for the machine's GPU architecture only, converts a synthetic
# target (~300M parameters, F16) and its Q4_K_M, and measures tokens/s on the engine with and
# without offload and with and without the Q4_K_M as draft, plus the planner's decisions on the
# real free memory.  Figures go to $OUT/gpu_check.json (and the log to $OUT/gpu_check.log).
set -euo pipefail
OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
cd "$(dirname "$0")/.."
start=$(date +%s)
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
echo "GPU: $(nvidia-smi --query-gpu=name,memory.free --format=csv,noheader); CUDA arch $arch"
python3 -m venv /tmp/gpu-venv
PY=/tmp/gpu-venv/bin/python
$PY -m pip install --quiet --no-index --find-links .whl numpy gguf sentencepiece click jinja2 tqdm threadpoolctl \
    cryptography rapidfuzz pyserial diskcache typing-extensions
CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$arch -DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    $PY -m pip install --quiet --no-index --find-links .whl --no-build-isolation --no-deps llama-cpp-python==0.3.36 \
    || $PY -m pip install --quiet --no-index --find-links .whl --no-deps llama-cpp-python==0.3.36
$PY -m pip install --quiet --no-index --no-deps --no-build-isolation -e . 2>/dev/null || \
    $PY -m pip install --quiet --no-index --find-links .whl --no-deps -e .
echo "built in $(( $(date +%s) - start )) s"
$PY - <<'EOF'
import json, os, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, "benchmarks")
from jee1.llama_backend import supports_gpu_offload
from jee1.edge.gpu_plan import ModelShape, accelerator_free_bytes, plan_pair
from jee1.gguf_info import read_gguf
import speculative_bench as sb

work = Path(tempfile.mkdtemp())
files = sb.build(work, os.cpu_count())
target, draft = files["target F16"], files["target Q4_K_M"]
free, source = accelerator_free_bytes()
plan, draft_plan = plan_pair(ModelShape.from_gguf(read_gguf(target)), ModelShape.from_gguf(read_gguf(draft)),
                             1024, "f16", free, 0, 512 * 2**20)
figures = {"gpu_offload_supported": supports_gpu_offload(), "free_bytes": free, "free_source": source,
           "plan": plan.__dict__, "draft_plan": draft_plan.__dict__, "runs": {}}
prompts = sb.QUESTIONS[:6]
for name, runtime in [("cpu", {"gpu_layers": 0}), ("gpu", {"gpu_layers": "auto"}),
                      ("gpu + Q4_K_M draft", {"gpu_layers": "auto", "draft": "model", "draft_model": str(draft)}),
                      ("gpu + prompt lookup", {"gpu_layers": "auto", "draft": "prompt-lookup"})]:
    got = sb.run_engine(target, work / name.replace(" ", "_"), os.cpu_count(), 64, prompts, runtime)
    bodies = got.pop("bodies")
    reference = reference if name != "cpu" else bodies
    figures["runs"][name] = got | {"same_answers_as_cpu": bodies == reference}
Path(os.environ.get("OUT", "/tmp"), "gpu_check.json").write_text(json.dumps(figures, indent=2))
print(json.dumps(figures, indent=2))
EOF
echo "done in $(( $(date +%s) - start )) s"
