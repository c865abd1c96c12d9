"""Reading a GGUF file: its metadata and tensor table from the header, tensor bytes through a memory map.

gguf's own GGUFReader builds a numpy object per string of the vocabulary (about 20 s for a 262k-token
vocabulary); this reader parses the header with struct and leaves the tensor data mapped.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tqinfer.hub import ModelError, format_bytes

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # PyTorch / HF order (GGUF stores the reverse)
    n_elements: int
    n_bytes: int
    offset: int  # absolute, in the file
    data: np.ndarray  # raw bytes (uint8), one row per output feature


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict
    tensors: list[GGUFTensor]

    def tensor(self, name: str) -> GGUFTensor | None:
        return next((t for t in self.tensors if t.name == name), None)


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise struct.error("string runs past the end of the file")
        out = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", "replace")
        self.pos += n
        return out

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            sub, n = self.take("I"), self.take("Q")
            if sub in _NUMPY:
                dtype = np.dtype(_NUMPY[sub]).newbyteorder("<")
                end = self.pos + n * dtype.itemsize
                if end > len(self.buf):
                    raise struct.error("array runs past the end of the file")
                out = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).tolist()
                self.pos = end
                return out
            return [self.value(sub) for _ in range(n)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {kind}")
        return self.take(_SCALARS[kind])


def check_magic(path: Path) -> None:
    """Raise ModelError unless `path` starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file: it starts with {magic!r}, a GGUF starts with {GGUF_MAGIC!r}")


def read_gguf(path: Path) -> GGUFFile:
    """Parse a GGUF; bad magic, a cut-off header and missing tensor bytes are ModelErrors."""
    import gguf

    path = Path(path)
    check_magic(path)
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    size = len(buf)
    cur = _Cursor(buf)
    try:
        cur.pos = 4
        version = cur.take("I")
        if version not in (2, 3):
            raise ModelError(f"{path} is GGUF version {version}; versions 2 and 3 are supported")
        n_tensors, n_kv = cur.take("Q"), cur.take("Q")
        metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.take("I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.take("Q") for _ in range(cur.take("I"))]
            infos.append((name, dims, cur.take("I"), cur.take("Q")))
    except (struct.error, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{path} is truncated or corrupt: its GGUF header cannot be read ({e})") from None
    alignment = int(metadata.get("general.alignment", 32))
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    tensors, end = [], data_start
    for name, dims, kind, offset in infos:
        try:
            qtype = gguf.GGMLQuantizationType(kind)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ModelError(f"{path}: tensor {name} has unknown GGML type {kind}") from None
        n = int(np.prod(dims, dtype=np.int64)) if dims else 1
        n_bytes = n // block * type_size
        start = data_start + offset
        end = max(end, start + n_bytes)
        tensors.append((name, qtype, tuple(int(d) for d in reversed(dims)), n, n_bytes, start, type_size, block))
    if end > size:
        raise ModelError(f"{path} is truncated: expected {format_bytes(end)}, found {format_bytes(size)}")
    out = []
    for name, qtype, shape, n, n_bytes, start, type_size, block in tensors:
        raw = np.frombuffer(buf, dtype=np.uint8, count=n_bytes, offset=start)
        row_bytes = shape[-1] // block * type_size if shape else n_bytes
        raw = raw.reshape(-1, row_bytes) if len(shape) > 1 else raw
        out.append(GGUFTensor(name, qtype, shape, n, n_bytes, start, raw))
    return GGUFFile(path=path, version=version, metadata=metadata, tensors=out)


def dequantize(tensor: GGUFTensor) -> np.ndarray:
    """A tensor as float32 in HF layout, through the gguf package (every type it can dequantize)."""
    import gguf

    try:
        out = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ModelError(
            f"GGUF tensor {tensor.name} has type {tensor.tensor_type.name}, which the gguf package cannot dequantize"
        ) from None
    return np.asarray(out, dtype=np.float32).reshape(tensor.shape)
