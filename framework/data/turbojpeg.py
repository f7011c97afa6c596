"""A minimal ctypes binding of libjpeg-turbo's TurboJPEG API (the library FFCV decodes with).

Used where the framework needs to decode JPEG bytes outside FFCV's pipeline: the tests compare
FFCV's output against it and the loader benchmark times it as the decode limit.
"""
from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np

TJPF_RGB = 0
TJFLAG_NOREALLOC = 1024
TJFLAG_FASTDCT = 2048

_lib = None


def _load():
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("turbojpeg") or "libturbojpeg.so.0"
        try:
            lib = ctypes.CDLL(name)
        except OSError as e:  # pragma: no cover - depends on the machine
            raise RuntimeError(f"libturbojpeg not found ({e}); install Debian's libturbojpeg0-dev") from e
        lib.tjInitDecompress.restype = ctypes.c_void_p
        lib.tjDestroy.argtypes = [ctypes.c_void_p]
        lib.tjDecompressHeader3.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong] + \
            [ctypes.POINTER(ctypes.c_int)] * 4
        lib.tjDecompress2.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p,
                                      ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.tjGetErrorStr2.argtypes = [ctypes.c_void_p]
        lib.tjGetErrorStr2.restype = ctypes.c_char_p
        _lib = lib
    return _lib


class Decoder:
    """decode(jpeg bytes) -> (H, W, 3) uint8 RGB. One handle per Decoder; not thread-safe."""

    def __init__(self, fast_dct: bool = True):
        self.lib = _load()
        self.handle = self.lib.tjInitDecompress()
        self.flags = TJFLAG_NOREALLOC | (TJFLAG_FASTDCT if fast_dct else 0)

    def _error(self) -> str:
        return self.lib.tjGetErrorStr2(self.handle).decode(errors="replace")

    def header(self, data: bytes) -> tuple[int, int]:
        w, h, sub, cs = (ctypes.c_int() for _ in range(4))
        if self.lib.tjDecompressHeader3(self.handle, data, len(data), ctypes.byref(w), ctypes.byref(h),
                                        ctypes.byref(sub), ctypes.byref(cs)) != 0:
            raise ValueError(f"not a JPEG: {self._error()}")
        return h.value, w.value

    def decode(self, data: bytes) -> np.ndarray:
        data = bytes(data)
        h, w = self.header(data)
        out = np.empty((h, w, 3), np.uint8)
        if self.lib.tjDecompress2(self.handle, data, len(data), out.ctypes.data, w, 0, h, TJPF_RGB, self.flags) != 0:
            raise ValueError(f"JPEG decode failed: {self._error()}")
        return out

    def __del__(self):
        if getattr(self, "handle", None):
            self.lib.tjDestroy(self.handle)
            self.handle = None
