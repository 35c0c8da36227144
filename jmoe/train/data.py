"""Token streams for the trainer: corpora, Grain pipelines, device batches.

A corpus is two flat token arrays, `train` and `val` (NumPy, possibly
memory-mapped). An example is a window of `seq_len + 1` consecutive tokens
(inputs and shifted targets); the train set is cut into non-overlapping
windows, shuffled with the config seed and reshuffled every epoch.

Determinism across topologies: the pipeline first forms *global* batches of
window indices, then each process gathers only the rows its devices hold.
The global batch at step s is therefore the same on 1 or 64 processes, and the
iterator state (`{"next_index": s}`) can be restored on any of them.

Sources (`config.data.source`):
  stdlib  the Python standard library's `.py` files read as bytes (vocab 256),
          split into train/val by file; no download.
  text    a text file (split by position) or a folder of files (split by file),
          read as bytes (vocab 256).
  tokens  a pre-tokenised `.npy` or raw `.bin` array of uint16/uint32 token ids,
          memory-mapped; `config.model.vocab_size` must exceed every id.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import sysconfig
import zlib
from typing import Any

import grain
import jax
import numpy as np

BYTE_VOCAB = 256
SOURCES = ("stdlib", "text", "tokens")
# Files bigger than this are not source code worth learning from (generated
# tables, test data); skipping them keeps the stdlib corpus about code.
_MAX_FILE_BYTES = 2 << 20


@dataclasses.dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # [N_train] integer token ids
    val: np.ndarray  # [N_val]
    vocab_size: int
    description: str


def _is_val_file(relpath: str, val_percent: float) -> bool:
    # crc32 of the relative path: stable across machines, runs and Python
    # versions (unlike hash()), so the split is fixed by the file's name.
    bucket = zlib.crc32(relpath.replace(os.sep, "/").encode()) % 10_000
    return bucket < val_percent * 100


def stdlib_root() -> str:
    """The directory of the running Python's standard library.

    `sysconfig` answers with the base interpreter's library even inside a
    virtual environment (where `sys.prefix` is the venv).
    """
    return sysconfig.get_paths()["stdlib"]


def _list_files(root: str, pattern: str, skip_dirs: tuple[str, ...]) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        for name in sorted(filenames):
            if fnmatch.fnmatch(name, pattern):
                out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return out


def _read_split_by_file(root: str, files: list[str], val_percent: float) -> tuple[np.ndarray, np.ndarray]:
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    for rel in files:
        path = os.path.join(root, rel)
        if os.path.getsize(path) > _MAX_FILE_BYTES:
            continue
        with open(path, "rb") as f:
            parts[_is_val_file(rel, val_percent)].append(f.read())
    train = np.frombuffer(b"".join(parts[False]), dtype=np.uint8)
    val = np.frombuffer(b"".join(parts[True]), dtype=np.uint8)
    return train, val


def _split_by_position(tokens: np.ndarray, val_percent: float) -> tuple[np.ndarray, np.ndarray]:
    n_val = int(len(tokens) * val_percent / 100)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]


def load_corpus(data_cfg: Any, vocab_size: int) -> Corpus:
    """Loads `config.data` into a `Corpus`; raises ValueError on bad paths."""
    source, path, pct = data_cfg.source, data_cfg.path, float(data_cfg.val_percent)
    if source == "stdlib":
        root = stdlib_root()
        files = _list_files(root, "*.py", ("site-packages", "dist-packages", "__pycache__"))
        train, val = _read_split_by_file(root, files, pct)
        desc = f"stdlib {root} ({len(files)} .py files)"
        vocab = BYTE_VOCAB
    elif source == "text":
        if not path or not os.path.exists(path):
            raise ValueError(f"config.data.path={path!r} does not exist: point it at a text "
                             "file or a folder of text files.")
        if os.path.isdir(path):
            files = _list_files(path, data_cfg.glob, ("__pycache__",))
            if not files:
                raise ValueError(f"config.data.path={path!r} has no files matching "
                                 f"config.data.glob={data_cfg.glob!r}.")
            train, val = _read_split_by_file(path, files, pct)
            desc = f"text folder {path} ({len(files)} files)"
        else:
            train, val = _split_by_position(np.fromfile(path, dtype=np.uint8), pct)
            desc = f"text file {path}"
        vocab = BYTE_VOCAB
    elif source == "tokens":
        train, val = _split_by_position(load_token_file(path, data_cfg.dtype), pct)
        desc = f"tokens {path}"
        vocab = vocab_size
        _check_ids(train, vocab, "config.model.vocab_size")
    else:
        raise ValueError(f"config.data.source={source!r} is unknown: choose one of {SOURCES}.")
    if vocab_size < vocab:
        raise ValueError(f"config.model.vocab_size={vocab_size} is smaller than the data's "
                         f"vocabulary ({vocab}): raise it.")
    return Corpus(train=train, val=val, vocab_size=vocab, description=desc)


def load_token_file(path: str, dtype: str = "uint16") -> np.ndarray:
    """Memory-maps a `.npy` (dtype from its header) or raw `.bin` token file."""
    if not path or not os.path.isfile(path):
        raise ValueError(f"config.data.path={path!r} is not a file: give a .npy or .bin "
                         "array of token ids.")
    if path.endswith(".npy"):
        arr = np.load(path, mmap_mode="r")
    else:
        if dtype not in ("uint16", "uint32"):
            raise ValueError(f"config.data.dtype={dtype!r} is invalid for .bin files: "
                             "choose uint16 or uint32.")
        arr = np.memmap(path, dtype=np.dtype(dtype), mode="r")
    if arr.ndim != 1 or arr.dtype not in (np.uint16, np.uint32, np.int32, np.int64):
        raise ValueError(f"config.data.path={path!r} holds a {arr.dtype} array of shape "
                         f"{arr.shape}: expected a flat uint16/uint32 token array.")
    return arr


def _check_ids(tokens: np.ndarray, vocab_size: int, field: str) -> None:
    # A full max() over a memory-mapped file of billions of tokens would read
    # it all at start-up; a strided sample catches a wrong vocab all the same.
    stride = max(1, len(tokens) // 10_000_000)
    top = int(tokens[::stride].max()) if len(tokens) else 0
    if top >= vocab_size:
        raise ValueError(f"{field}={vocab_size} is too small: the token file holds id {top}. "
                         f"Set {field} > {top}.")


class _Windows:
    """Random access to window `i` = tokens[i*L : i*L + L + 1] (int32)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.n = max(0, (len(tokens) - 1) // seq_len)

    def __len__(self) -> int:
        return self.n

    def gather(self, idx: np.ndarray) -> np.ndarray:
        L = self.seq_len
        return np.stack([np.asarray(self.tokens[i * L: i * L + L + 1], dtype=np.int32)
                         for i in idx])


def local_rows(sharding: jax.sharding.Sharding, global_batch: int, seq_len: int) -> np.ndarray:
    """Rows of the global batch held by this process's devices, in order."""
    idx_map = sharding.addressable_devices_indices_map((global_batch, seq_len + 1))
    starts = sorted({(s[0].start or 0, s[0].stop or global_batch) for s in idx_map.values()})
    return np.concatenate([np.arange(a, b) for a, b in starts])


def train_iterator(tokens: np.ndarray, *, seq_len: int, global_batch: int, seed: int,
                   local_rows: np.ndarray | None = None) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of this process's `[B_local, L+1]` rows.

    Window indices are shuffled with `seed` (a fresh permutation every epoch),
    grouped into global batches, and only `local_rows` of each batch are read.
    """
    windows = _Windows(tokens, seq_len)
    if len(windows) < global_batch:
        raise ValueError(f"the training split has {len(windows)} windows of "
                         f"{seq_len + 1} tokens, fewer than config.batch_size={global_batch}: "
                         "use more data or a smaller batch/seq_len.")
    rows = np.arange(global_batch) if local_rows is None else local_rows
    ds = (grain.MapDataset.range(len(windows))
          .shuffle(seed=seed)
          .repeat(None)
          .batch(global_batch, drop_remainder=True)
          .map(lambda idx: windows.gather(idx[rows])))
    # A few reader threads keep the next batches ready; the iterator state is
    # still the logical position, independent of what is prefetched.
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
    return iter(ds.to_iter_dataset(read))


def eval_batches(tokens: np.ndarray, *, seq_len: int, global_batch: int, num_batches: int,
                 local_rows: np.ndarray | None = None, seed: int = 1234) -> list[np.ndarray]:
    """The same `num_batches` held-out batches every time (spread over the split)."""
    windows = _Windows(tokens, seq_len)
    if len(windows) == 0:
        raise ValueError(f"the validation split is shorter than seq_len+1={seq_len + 1} tokens: "
                         "raise config.data.val_percent or lower seq_len.")
    rows = np.arange(global_batch) if local_rows is None else local_rows
    order = grain.MapDataset.range(len(windows)).shuffle(seed=seed).repeat(None)
    out = []
    for b in range(num_batches):
        idx = np.array([order[b * global_batch + j] for j in range(global_batch)])
        out.append(windows.gather(idx[rows]))
    return out


def to_global(batch_BT: np.ndarray, sharding: jax.sharding.Sharding, global_batch: int) -> jax.Array:
    """Assembles this process's rows into the global `[B, L+1]` device array."""
    shape = (global_batch,) + batch_BT.shape[1:]
    return jax.make_array_from_process_local_data(sharding, batch_BT, shape)


# A split up to this size is checksummed whole at start-up (about 0.3 s per
# 256 MB); a larger one (a memory-mapped token file of billions of tokens) by
# its first and last MB and 62 blocks of 1 MB spread evenly in between.
_FULL_CRC_BYTES = 256 << 20
_BLOCK_BYTES = 1 << 20
_BLOCKS = 64
# The fields a resumed run must match; `source` and `path` are only reported
# (a moved or renamed copy of the same data is the same data).
FINGERPRINT_KEYS = ("dtype", "train_tokens", "val_tokens", "train_crc32", "val_crc32")


def _crc32(tokens: np.ndarray) -> str:
    raw = np.asarray(tokens).view(np.uint8) if tokens.flags.c_contiguous else \
        np.ascontiguousarray(tokens).view(np.uint8)
    if raw.size <= _FULL_CRC_BYTES:
        return f"{zlib.crc32(raw):08x}"
    starts = np.linspace(0, raw.size - _BLOCK_BYTES, _BLOCKS).astype(np.int64)
    crc = 0
    for s in starts:
        crc = zlib.crc32(raw[s: s + _BLOCK_BYTES], crc)
    return f"{crc:08x}-sampled"


def fingerprint(corpus: Corpus, data_cfg: Any) -> dict:
    """What a resumed run must train on again: the token dtype, the sizes of
    the train and val splits and a CRC-32 of each (whole, or sampled for a
    split over 256 MB); also the source and path, for the message."""
    return {"source": data_cfg.source, "path": data_cfg.path,
            "dtype": str(corpus.train.dtype),
            "train_tokens": int(len(corpus.train)), "val_tokens": int(len(corpus.val)),
            "train_crc32": _crc32(corpus.train), "val_crc32": _crc32(corpus.val)}


def fingerprint_change(saved: dict, now: dict) -> str:
    """'' when `now` is the data of `saved`, else which fields differ (saved -> now)."""
    diff = [f"{k} {saved.get(k)} -> {now.get(k)}" for k in FINGERPRINT_KEYS
            if saved.get(k) != now.get(k)]
    return ", ".join(diff)
