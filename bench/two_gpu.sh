#!/usr/bin/env bash
# Two GPUs against one, same code, same per-GPU batches, one machine, one command:
#
#   bash bench/two_gpu.sh /tmp/g2b "speed;memory" bench/results/perf_two_gpu.jsonl
#
# 1. one GPU (CUDA_VISIBLE_DEVICES=0), --batch 8 (8 x 512 a step)
# 2. data parallel: `accelerate launch` with two processes, one 4-bit copy on each GPU,
#    --batch 16 (each GPU still takes 8 x 512 a step; tokens/s counts both)
# 3. balanced: one process, one copy, its layers split over both GPUs, --batch 8
# Then, with STRONG=1, data parallel at --batch 8 (4 x 512 on each GPU: the same global
# batch as one GPU, so each GPU does half the work a step).
# Every row carries its command line; extra arguments after the third go to every run.
set -euo pipefail
model=${1:?model folder (bench/make_gemma2_2b.py)}
modes=${2:-speed;memory}
out=${3:-bench/results/perf_two_gpu.jsonl}
shift $(( $# < 3 ? $# : 3 ))
here=$(dirname "$0")
# NVLink multicast stays off (the GPU machine's rule; harmless elsewhere).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
n=$(python3 -c 'import torch; print(torch.cuda.device_count())')
if [ "$n" -lt 2 ]; then
    echo "two_gpu.sh: $n CUDA GPU(s) visible; this comparison needs two" >&2
    exit 2
fi
CUDA_VISIBLE_DEVICES=0 python3 "$here/perf.py" "$model" --modes "$modes" --batch 8 --out "$out" "$@"
accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
    --dynamo_backend no "$here/perf.py" "$model" --modes "$modes" --batch 16 --out "$out" "$@"
CUDA_VISIBLE_DEVICES=0,1 python3 "$here/perf.py" "$model" --modes "$modes" --batch 8 \
    --placement balanced --out "$out" "$@"
if [ "${STRONG:-0}" = 1 ]; then
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no "$here/perf.py" "$model" --modes "$modes" --batch 8 --out "$out" "$@"
fi
