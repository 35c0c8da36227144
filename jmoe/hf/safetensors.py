"""Reading and writing the safetensors format without a framework.

A `.safetensors` file is an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`
and the raw little-endian bytes. Reading memory-maps the file, so a tensor
(or the slice of it that one device needs) is read only when asked for; no
framework is involved, and bfloat16 comes through `ml_dtypes` (a JAX
dependency). A sharded checkpoint is several such files plus
`model.safetensors.index.json` mapping each tensor name to its file.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
          "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Checkpoint(Mapping[str, np.ndarray]):
    """The tensors of an HF directory (one file or a sharded index), lazily.

    `ckpt[name]` is a read-only `np.memmap` view: slicing it reads only the
    bytes of the slice. `ckpt.shape(name)` reads no data at all.
    """

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(path, SINGLE)):
            files = [SINGLE]
        else:
            found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not found:
                raise FileNotFoundError(
                    f"{path} holds no {SINGLE} and no {INDEX}: point jmoe.hf at a directory "
                    "written by save_pretrained (safetensors; .bin checkpoints are not read).")
            files = found
        self._entries: dict[str, tuple[str, dict, int]] = {}
        for name in files:
            fpath = os.path.join(path, name)
            header, start = read_header(fpath)
            for key, meta in header.items():
                if key != "__metadata__":
                    self._entries[key] = (fpath, meta, start)
        self._maps: dict[str, np.memmap] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        fpath, meta, start = self._entries[key]
        if fpath not in self._maps:
            self._maps[fpath] = np.memmap(fpath, np.uint8, mode="r")
        if meta["dtype"] not in DTYPES:
            raise ValueError(f"tensor {key!r} in {fpath} has dtype {meta['dtype']}; jmoe.hf "
                             f"reads {sorted(DTYPES)}.")
        b, e = meta["data_offsets"]
        raw = self._maps[fpath][start + b:start + e]
        return raw.view(DTYPES[meta["dtype"]]).reshape(meta["shape"])

    def __contains__(self, key) -> bool:  # Mapping's default would read the tensor
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key][1]["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def read_header(fpath: str) -> tuple[dict, int]:
    """(header dict, byte offset where the data starts)."""
    with open(fpath, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def save_file(tensors: Mapping[str, np.ndarray], fpath: str,
              metadata: Mapping[str, str] | None = None) -> None:
    """Writes `tensors` (numpy arrays) as one safetensors file, in name order."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    names = sorted(tensors)
    for name in names:
        a = tensors[name]
        header[name] = {"dtype": _NAMES[np.dtype(a.dtype)], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(fpath, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            f.write(np.ascontiguousarray(tensors[name]).tobytes())
