"""Read a safetensors file tensor by tensor with plain reads, never through a memory map.

Format: 8 bytes of little-endian header length, a JSON header (dtype, shape, data_offsets per tensor),
then the raw little-endian data. Used where peak memory matters: quantizing a base while loading it
(quant/loader.py) and folding an adapter into a base shard by shard (merge/fold.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ModelError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class TensorFile:
    """One safetensors file read tensor by tensor with plain reads (format: u64 header length, JSON
    header, raw little-endian data). Not memory-mapped on purpose: a mapped file's touched pages count
    in the process's resident memory until it exits, so reading through a map shows (and on a tight
    machine costs) the whole float checkpoint, which this loader exists to avoid."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.start = 8 + n
        self.entries = header

    def keys(self) -> list[str]:
        return list(self.entries)

    def span(self, key: str) -> tuple[int, int]:
        """[start, end) of the tensor's bytes in the file."""
        begin, end = self.entries[key]["data_offsets"]
        return self.start + begin, self.start + end

    def nbytes(self, key: str) -> int:
        begin, end = self.entries[key]["data_offsets"]
        return end - begin

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype, from the header (nothing is read)."""
        dtype = DTYPES.get(self.entries[key]["dtype"])
        if dtype is None:
            raise ModelError(f"{self.path.name}: tensor {key} has dtype {self.entries[key]['dtype']}, which leantune "
                             "cannot read")
        return dtype

    def get(self, key: str, scratch: bytearray | None = None) -> torch.Tensor:
        """The tensor, in fresh memory; or, with `scratch` (big enough), a view of it that the next
        read overwrites: one buffer reused for every weight that is quantized and dropped keeps the
        allocator from scattering freed float weights between the kept quantized ones."""
        entry = self.entries[key]
        begin, end = entry["data_offsets"]
        buf = memoryview(scratch)[: end - begin] if scratch is not None else bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            f.readinto(buf)
        dtype = self.dtype(key)
        if not buf:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(entry["shape"])


def tensor_index(files) -> dict[str, TensorFile]:
    """{tensor name: the file's reader} over a checkpoint's safetensors files (one header read per file)."""
    readers = [TensorFile(Path(f)) for f in files]
    return {key: r for r in readers for key in r.keys()}
