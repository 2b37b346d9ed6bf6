#!/usr/bin/env python3
"""Compiles a crate's CUDA source to the PTX it ships, with NVRTC (no CUDA toolkit needed).

Usage: python3 scripts/gen_ptx.py path/to/kernels.cu [path/to/libnvrtc.so]

Writes the PTX next to the source, with the extension `.ptx`.

The PTX targets ISA 8.0 and sm_80 (compute_80), so drivers from CUDA 12.0 on JIT-compile it
for Ampere, Hopper and later GPUs. When `ptxas` is on PATH the result is also assembled for
sm_90 as a check.
"""
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile

PTX_VERSION = "8.0"


def load_nvrtc():
    names = sys.argv[2:] or ["libnvrtc.so", "libnvrtc.so.12", "libnvrtc.so.13"]
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    sys.exit("libnvrtc not found: pass its path as the first argument")


def check(nvrtc, code, what):
    if code != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        sys.exit(f"{what} failed: {nvrtc.nvrtcGetErrorString(code).decode()}")


def main():
    if len(sys.argv) < 2 or not sys.argv[1].endswith(".cu"):
        sys.exit(__doc__)
    src = sys.argv[1]
    out = src[: -len(".cu")] + ".ptx"
    name = os.path.basename(src)
    nvrtc = load_nvrtc()
    with open(src, "rb") as f:
        source = f.read()
    prog = ctypes.c_void_p()
    check(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source, name.encode(), 0, None, None),
          "nvrtcCreateProgram")
    opts = [b"--gpu-architecture=compute_80", b"--std=c++17"]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    code = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    if log.value.strip():
        print(log.value.decode(), file=sys.stderr)
    check(nvrtc, code, "nvrtcCompileProgram")
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    check(nvrtc, nvrtc.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
    text = ptx.value.decode()
    # Pin the ISA version: the kernels use nothing newer, and an older version JIT-compiles on
    # older drivers too.
    text = re.sub(r"^\.version .*$", f".version {PTX_VERSION}", text, count=1, flags=re.M)
    # Drop the compiler's build banner (it names the local toolkit build).
    text = "\n".join(l for l in text.splitlines() if not l.startswith("// Cuda compilation tools")
                     and not l.startswith("// Based on") and not l.startswith("// Compiler Build ID"))
    header = f"//\n// Generated from {name} by gen_ptx.py (NVRTC, compute_80); do not edit by hand.\n"
    text = header + text.strip() + "\n"
    ptxas = shutil.which("ptxas")
    if ptxas:
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "k.ptx")
            with open(p, "w") as f:
                f.write(text)
            subprocess.run([ptxas, "-arch=sm_90", p, "-o", os.path.join(d, "k.cubin")], check=True)
            print("ptxas sm_90: ok")
    with open(out, "w") as f:
        f.write(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
