#!/usr/bin/env bash
# Entry point of the GPU bundle built by `cargo xtask test-multigpu`.
#   bash run.sh gpu    run the GPU test executables (names containing "gpu")
#   bash run.sh all    run every test executable
#   bash run.sh bench  run the benchmarks beside their PyTorch peers; results land in $OUT or
#                      ./results: bench.jsonl (one labelled JSON result a line) and bench.log
#   bash run.sh gpu+bench  both
#   bash run.sh scale  expert parallelism over every visible GPU (4 or 8; 2 to try it out):
#                      random layer plans through the nccl and nixl EPLB communicators, every
#                      row verified, a 30 s deadline per plan; one DeepSeek-V3-sized layer
#                      rearrangement beside PyTorch's batch_isend_irecv of the same plan; the
#                      all-to-all dispatch/combine beside all_to_all_single; weight transfer
#                      from 1 trainer GPU to the others. Results as for bench.
#   bash run.sh shared the GPU tests, then the all-to-all, EPLB (random and re-planned layers,
#                      nccl and nixl, every row verified) and weight-sync programs, as N ranks
#                      even on one GPU (N = $MOESHIFT_GPU_RANKS, default 2; ranks share GPUs,
#                      NCCL between them over loopback sockets): the multi-rank paths at
#                      scale. Correctness only: its timings are not bandwidth figures.
# Needs: NVIDIA driver, CUDA runtime, NCCL (libnccl.so or libnccl.so.2), python3 + torch for the
# peer baseline. Nothing is downloaded.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mode=${1:-gpu}
results=${OUT:-$here/results}
mkdir -p "$results"

export NCCL_NVLS_ENABLE=0
# cudarc looks for libnccl.so; NCCL's soname is libnccl.so.2. Provide the link when missing.
if ! ldconfig -p | grep -q 'libnccl.so '; then
  nccl2=$(ldconfig -p | awk '/libnccl.so.2 /{print $NF; exit}')
  if [ -n "$nccl2" ]; then
    mkdir -p "$here/.libs" && ln -sf "$nccl2" "$here/.libs/libnccl.so"
    export LD_LIBRARY_PATH="$here/.libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
fi
if [ -f "$here/nixl-runtime.tar.xz" ] && [ ! -d "$here/.nixl" ]; then
  mkdir -p "$here/.nixl" && tar -C "$here/.nixl" -xJf "$here/nixl-runtime.tar.xz"
fi
export MOESHIFT_NIXL_LIB_DIR="$here/.nixl/.nixl_cu13.mesonpy.libs"
export NIXL_PLUGIN_DIR="$MOESHIFT_NIXL_LIB_DIR/plugins"
export PATH="$here/bin:$PATH"

nvidia-smi -L || echo "warning: nvidia-smi -L failed"
fail=0; passed=0; failed=0

run_tests() { # pattern
  for t in "$here"/tests/*; do
    name=$(basename "$t")
    case "$name" in $1) ;; *) continue ;; esac
    echo "==> $name"
    echo "==> $name" >> "$results/tests.log"
    # A crate's unit-test executable: only its GPU tests.
    filter=""; case "$name" in *_lib_gpu) filter="gpu_" ;; esac
    if "$t" $filter ${TEST_ARGS:-} --test-threads=1 2>&1 | tee -a "$results/tests.log"; then
      passed=$((passed + 1))
    else
      failed=$((failed + 1)); fail=1; echo "FAILED: $name"
    fi
  done
}

# The last JSON object in a program's output, on one line: rank 0's lines lose the launcher's
# "[rank 0] " prefix, other ranks' lines are ignored, a leading `NAME_RESULT ` marker is skipped,
# and objects may span several lines.
last_json='
import json, re, sys
lines = []
for line in sys.stdin.read().splitlines():
    m = re.match(r"\[rank (\d+)\] ?(.*)", line)
    if m and m.group(1) != "0":
        continue
    lines.append(m.group(2) if m else line)
text = "\n".join(lines)
found, at, decoder = None, 0, json.JSONDecoder()
while True:
    at = text.find("{", at)
    if at < 0:
        break
    try:
        obj, end = decoder.raw_decode(text, at)
    except ValueError:
        at += 1
        continue
    found, at = obj, end
if found is not None:
    print(json.dumps(found))
'

# Runs one benchmark, keeps its output in bench.log and its JSON result (the last line that is
# a JSON object, with or without the launcher's "[rank 0] " prefix) in bench.jsonl, labelled.
bench() { # label command...
  local label=$1; shift
  echo "==> bench $label: $*" | tee -a "$results/bench.log"
  local out rc json
  out=$("$@" 2>&1); rc=$?
  printf '%s\n' "$out" >> "$results/bench.log"
  json=$(printf '%s\n' "$out" | python3 -c "$last_json")
  if [ $rc -ne 0 ] || [ -z "$json" ]; then
    echo "FAILED: bench $label (rc=$rc)" | tee -a "$results/bench.log"; fail=1
    printf '{"label": "%s", "failed": true, "rc": %d}\n' "$label" "$rc" >> "$results/bench.jsonl"
  else
    printf '{"label": "%s", "result": %s}\n' "$label" "$json" >> "$results/bench.jsonl"
    echo "$json"
  fi
}

run_benches() {
  : > "$results/bench.jsonl"
  local ex="$here/examples" L="moeshift launch --nproc 2 --timeout 300 --"
  # The PyTorch peer first: NCCL point-to-point, a vLLM-style EPLB layer, dense vs sparse sync.
  if [ -f "$here/torch_peer_baseline.py" ]; then
    bench torch_peer python3 "$here/torch_peer_baseline.py"
  fi
  [ -x "$ex/nccl_bw" ] && bench nccl_p2p $L "$ex/nccl_bw"
  # One DeepSeek-V3-sized layer (w13 [4096,7168] + w2 [7168,2048] bf16), 32 experts per rank,
  # 8 moved each way, as the peer's figure 2.
  local layer="--layers 3 --experts-per-rank 32 --moved-per-rank 8 --tensors 2 --tensor-bytes 58720256,29360128 --device cuda --verify"
  for b in nccl nixl host; do
    bench "eplb_$b" $L moeshift bench eplb-comm --backend $b $layer
  done
  # NIXL with each peer's READs on one UCX worker (one CUDA stream), against the default.
  bench eplb_nixl_1_stream $L moeshift bench eplb-comm --backend nixl --nixl-read-streams 1 $layer
  # A rearrangement of 8 such layers: one at a time, and in one pipelined `rearrange` call
  # (each layer's commit overlapping the next layer's transfer; nixl with 2 landing slots).
  local model="--layers 8 --experts-per-rank 32 --moved-per-rank 8 --tensors 2 --tensor-bytes 58720256,29360128 --device cuda --verify"
  bench eplb_nixl_8_layers $L moeshift bench eplb-comm --backend nixl $model
  bench eplb_nixl_rearrange $L moeshift bench eplb-comm --backend nixl --rearrange $model
  bench eplb_nccl_rearrange $L moeshift bench eplb-comm --backend nccl --rearrange $model
  # 16 layers: the pipeline's fill (first agreement) and drain (last commit) weigh half as much.
  bench eplb_nixl_rearrange_16 $L moeshift bench eplb-comm --backend nixl --rearrange ${model/--layers 8/--layers 16}
  # 494M bf16 parameters, 1 trainer + 1 worker: dense, packed, sparse at 0.1 %, CUDA IPC.
  local ws="--params 494000000 --tensors 24 --dtype bf16 --device cuda --verify --reps 9"
  bench ws_nccl_dense $L moeshift bench weight-sync --engine nccl --mode dense $ws
  bench ws_nccl_packed $L moeshift bench weight-sync --engine nccl --mode packed $ws
  bench ws_nccl_sparse $L moeshift bench weight-sync --engine nccl --mode sparse --sparse-fraction 0.001 $ws
  bench ws_ipc_packed $L moeshift bench weight-sync --engine ipc --mode packed $ws
  # MoE dispatch + combine, 4096 tokens x 7168 bf16, top-8 of 256 experts, and its peer.
  local splits="$results/a2a_splits.json"
  [ -x "$ex/all2all_bw" ] && bench all2all $L "$ex/all2all_bw" --reps 9 --warmup 3 --splits-out "$splits"
  [ -f "$here/torch_all2all_peer.py" ] && [ -f "$splits" ] &&
    bench all2all_torch python3 "$here/torch_all2all_peer.py" --splits "$splits" --reps 9 --warmup 3
  # What copy engines reach between the two GPUs (the path one-sided CUDA IPC READs take).
  [ -f "$here/ce_peer_copy.py" ] && bench ce_peer_copy python3 "$here/ce_peer_copy.py"
  # Host transport against memcpy, on this machine's CPUs.
  [ -x "$ex/host_bw" ] && bench host_transport $L "$ex/host_bw" 64 256
}

# Everything of `run_benches` that matters at scale, on all visible GPUs.
run_scale() {
  local n
  n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
  if [ "$n" -lt 2 ]; then
    echo "scale: $n GPU(s) visible, at least 2 needed"; fail=1; return
  fi
  : > "$results/bench.jsonl"
  local ex="$here/examples" L="moeshift launch --nproc $n --timeout 3000 --"
  echo "scale: $n GPUs" | tee -a "$results/bench.log"
  # 1000 random layer plans per backend, every row checked, 30 s per plan: any hang or wrong
  # byte fails the run.
  local stress="--layers 1000 --experts-per-rank 16 --moved-per-rank 4 --tensors 2 --expert-bytes 262144 --device cuda --verify --deadline 30"
  for b in nccl nixl; do
    bench "stress_$b" $L moeshift bench eplb-comm --backend $b $stress
  done
  # 1000 re-planned layers with replicas (receives, local copies and duplicate fills).
  local replan="--plan deepseek --layers 1000 --experts-per-rank 9 --logical-experts 64 --tensors 2 --expert-bytes 262144 --device cuda --verify --deadline 30"
  for b in nccl nixl; do
    bench "stress_replan_$b" $L moeshift bench eplb-comm --backend $b $replan
  done
  # One DeepSeek-V3-sized layer (36 slots per GPU, 256 experts, 3 draws), re-planned after a
  # window of drift by the migration policy and by the DeepSeek policy, beside PyTorch
  # replaying the same moves (one batch_isend_irecv per layer, as vLLM does).
  local shape="--experts-per-rank 36 --logical-experts 256 --layers 3 --tensors 2 --tensor-bytes 58720256,29360128 --device cuda --verify"
  local p
  for p in migration deepseek; do
    local plan="$results/eplb_plan_$p.json"
    bench "eplb_${p}_nccl" $L moeshift bench eplb-comm --backend nccl --plan $p $shape --plan-out "$plan"
    bench "eplb_${p}_nixl" $L moeshift bench eplb-comm --backend nixl --plan $p $shape
    [ -f "$here/torch_eplb_peer.py" ] && [ -f "$plan" ] &&
      bench "eplb_${p}_torch" python3 "$here/torch_eplb_peer.py" --plan "$plan"
  done
  # MoE dispatch + combine over all GPUs, and its peer on the same split sizes.
  local splits="$results/a2a_splits.json"
  bench all2all $L "$ex/all2all_bw" --reps 9 --warmup 3 --splits-out "$splits"
  [ -f "$splits" ] &&
    bench all2all_torch python3 "$here/torch_all2all_peer.py" --splits "$splits" --reps 9 --warmup 3
  # 1 trainer GPU, n - 1 workers: dense and sparse.
  local ws="--params 494000000 --tensors 24 --dtype bf16 --device cuda --verify --reps 9"
  bench ws_nccl_dense $L moeshift bench weight-sync --engine nccl --mode dense $ws
  bench ws_nccl_sparse $L moeshift bench weight-sync --engine nccl --mode sparse --sparse-fraction 0.001 $ws
  bench ws_ipc_packed $L moeshift bench weight-sync --engine ipc --mode packed $ws
}

# The multi-rank GPU paths on however many GPUs there are (one is enough).
run_shared() {
  local n=${MOESHIFT_GPU_RANKS:-2}
  local ex="$here/examples" L="moeshift launch --nproc $n --timeout 900 --"
  : > "$results/bench.jsonl"
  echo "shared: $n ranks" | tee -a "$results/bench.log"
  # --nocapture: every rank's lines ("[rank 1] ...") land in tests.log.
  MOESHIFT_GPU_RANKS=$n TEST_ARGS=--nocapture run_tests '*gpu*'
  bench all2all_shared "$ex/all2all_bw" --ranks "$n" --share-gpus --reps 5 --warmup 1
  local stress="--layers 100 --experts-per-rank 16 --moved-per-rank 4 --tensors 2 --expert-bytes 262144 --device cuda --verify --deadline 60 --share-gpus"
  local replan="--plan deepseek --layers 100 --experts-per-rank 9 --logical-experts $((8 * n)) --tensors 2 --expert-bytes 262144 --device cuda --verify --deadline 60 --share-gpus"
  local b
  for b in nccl nixl; do
    bench "shared_stress_$b" $L moeshift bench eplb-comm --backend $b $stress
    bench "shared_replan_$b" $L moeshift bench eplb-comm --backend $b $replan
    bench "shared_rearrange_$b" $L moeshift bench eplb-comm --backend $b --rearrange ${stress/--layers 100/--layers 16}
  done
  local ws="--params 20000000 --tensors 24 --dtype bf16 --device cuda --verify --reps 3 --share-gpus"
  bench shared_ws_nccl_dense $L moeshift bench weight-sync --engine nccl --mode dense $ws
  bench shared_ws_nccl_sparse $L moeshift bench weight-sync --engine nccl --mode sparse --sparse-fraction 0.001 $ws
  bench shared_ws_ipc_packed $L moeshift bench weight-sync --engine ipc --mode packed $ws
}

case "$mode" in
  gpu) run_tests '*gpu*' ;;
  all) run_tests '*' ;;
  bench) run_benches ;;
  gpu+bench) run_tests '*gpu*'; run_benches ;;
  scale) run_scale ;;
  shared) run_shared ;;
  *) echo "usage: bash run.sh [gpu|all|bench|gpu+bench|scale|shared]"; exit 2 ;;
esac
[ "$mode" = bench ] || [ "$mode" = scale ] || echo "gpu tests: $passed passed, $failed failed"
exit $fail
