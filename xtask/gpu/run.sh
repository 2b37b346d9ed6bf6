#!/usr/bin/env bash
# Entry point of the GPU bundle built by `cargo xtask test-multigpu`.
#   bash run.sh gpu    run the GPU test executables (names containing "gpu")
#   bash run.sh all    run every test executable
#   bash run.sh bench  run the benchmarks and the PyTorch peer; JSON lands in $OUT or ./results
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
    if "$t" --test-threads=1 2>&1 | tee "$results/test-$name.log"; then
      passed=$((passed + 1))
    else
      failed=$((failed + 1)); fail=1; echo "FAILED: $name"
    fi
  done
}

case "$mode" in
  gpu) run_tests '*gpu*' ;;
  all) run_tests '*' ;;
  bench)
    if [ -x "$here/examples/nccl_bw" ]; then
      echo "==> nccl_bw (2 ranks)"
      moeshift launch --nproc 2 --timeout 300 -- "$here/examples/nccl_bw" \
        | tee "$results/nccl_bw.log" || fail=1
    fi
    if [ -f "$here/torch_peer_baseline.py" ]; then
      echo "==> torch_peer_baseline.py"
      python3 "$here/torch_peer_baseline.py" --out "$results/torch_peer.json" || fail=1
    fi
    ;;
  *) echo "usage: bash run.sh [gpu|all|bench]"; exit 2 ;;
esac
[ "$mode" = bench ] || echo "$passed passed, $failed failed"
exit $fail
