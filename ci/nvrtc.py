#!/usr/bin/env python3
"""Compiles CUDA C to PTX with NVRTC (libnvrtc.so.12 from the PyPI wheel
nvidia-cuda-nvrtc-cu12), through ctypes: no CUDA toolkit, no GPU.

    nvrtc.py LIBNVRTC ARCH INCLUDE_DIR SRC.cu OUT.ptx
"""
import ctypes
import sys


def check(lib, status, what, prog=None):
    if status == 0:
        return
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    msg = lib.nvrtcGetErrorString(status).decode()
    log = ""
    if prog is not None:
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace")
    sys.exit(f"nvrtc: {what}: {msg}\n{log}")


def main():
    libpath, arch, include, src, out = sys.argv[1:6]
    lib = ctypes.CDLL(libpath)
    code = open(src, "rb").read()
    prog = ctypes.c_void_p()
    check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), code, src.encode(), 0, None, None),
          "creating the program")
    opts = [
        f"--gpu-architecture={arch}".encode(),
        f"--include-path={include}".encode(),
        b"--std=c++17",
        b"--device-as-default-execution-space",
    ]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    status = lib.nvrtcCompileProgram(prog, len(opts), arr)
    check(lib, status, f"compiling {src}", prog)
    size = ctypes.c_size_t()
    check(lib, lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "PTX size")
    buf = ctypes.create_string_buffer(size.value)
    check(lib, lib.nvrtcGetPTX(prog, buf), "PTX")
    with open(out, "wb") as f:
        f.write(buf.value)


if __name__ == "__main__":
    main()
