#!/usr/bin/env bash
# Issue 8's CUDA checks and benchmarks in one go, on a machine with a GPU and torch, torchvision, timm and pytest
# installed (the device tool's lent machine: a copy of this tree without .git, so the caller sets
# SENET_GIT_REVISION for the results' provenance):
#
#   SENET_GIT_REVISION=$(git rev-parse HEAD) bash benchmarks/cuda_session.sh STAGE OUTDIR
#
# STAGE 1: the environment, the CUDA tests, the eager benchmarks; STAGE 2: the torch.compile benchmarks.
# After each step the results files written so far are packed into OUTDIR/results_stage<STAGE>.tgz; the log is
# OUTDIR/log_stage<STAGE>.txt. A failing step is logged with its exit status and the next one runs.
set -u
stage=${1:?"usage: cuda_session.sh STAGE(1|2) OUTDIR"}
out=${2:?"usage: cuda_session.sh STAGE(1|2) OUTDIR"}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
tag=${SENET_CUDA_TAG:-_cuda}
log="$out/log_stage$stage.txt"
so=(benchmarks/se_overhead.py)

pack() { tar czf "$out/results_stage$stage.tgz" benchmarks/results/*"$tag"*.json 2>/dev/null; }
step() {
    echo "=== $* ($(date +%T))" | tee -a "$log"
    "$@" 2>&1 | tee -a "$log"
    echo "=== rc ${PIPESTATUS[0]} ($(date +%T))" | tee -a "$log"
    pack
}

case "$stage" in
1)
    step nvidia-smi
    step "$py" -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', \
torchvision.__version__, 'timm', timm.__version__, torch.cuda.get_device_name(), 'cudnn', \
torch.backends.cudnn.version(), 'revision', __import__('senet.provenance').provenance.git_revision())"
    step "$py" -m pytest -q -p no:cacheprovider -n 8 tests/test_devices.py
    step "$py" -m pytest -q -p no:cacheprovider -n 8 tests/test_benchmark_scripts.py -k cuda
    step "$py" benchmarks/cuda_paths.py --device cuda --batch 32 64 --amp-batch 64 --tag "$tag"
    step "$py" "${so[@]}" resnet --device cuda --pair --infer-batch 1 16 64 --train-batch 16 64 --rounds 20 \
        --iters 10 --train-rounds 20 --tag "$tag"
    step "$py" "${so[@]}" timm --device cuda --modes eager channels_last --infer-batch 64 --train-batch 64 \
        --rounds 20 --iters 10 --train-rounds 20 --tag "${tag}_b64"
    step "$py" "${so[@]}" timm --device cuda --modes eager channels_last --infer-batch 1 --train-batch 16 \
        --rounds 20 --iters 10 --train-rounds 20 --tag "${tag}_b1_b16"
    step "$py" "${so[@]}" block --device cuda --batch 16 --rounds 20 --iters 50 --tag "${tag}_b16"
    step "$py" "${so[@]}" block --device cuda --batch 64 --rounds 20 --iters 20 --tag "${tag}_b64"
    step "$py" "${so[@]}" memory --device cuda --modes eager --train-batch 64 --tag "$tag"
    ;;
2)
    step "$py" "${so[@]}" timm --device cuda --modes compile --infer-batch 64 --train-batch 64 --rounds 20 \
        --iters 10 --train-rounds 20 --tag "${tag}_compile_b64"
    step "$py" "${so[@]}" resnet --device cuda --pair --modes compile --infer-batch 64 --train-batch 64 \
        --rounds 20 --iters 10 --train-rounds 20 --tag "${tag}_compile"
    step "$py" "${so[@]}" memory --device cuda --modes compile --train-batch 64 --tag "${tag}_compile"
    ;;
*)
    echo "cuda_session.sh: stage $stage: give 1 (tests, eager) or 2 (torch.compile)" >&2
    exit 2
    ;;
esac
