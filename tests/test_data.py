"""Corpora, splits, token files and the Grain iterators of jmoe.train.data."""

import os

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jmoe.train import data


def _data_cfg(**kw):
    c = dict(source="stdlib", path="", glob="*", dtype="uint16", val_percent=2.0, seq_len=16)
    c.update(kw)
    return ml_collections.ConfigDict(c)


@pytest.fixture(scope="module")
def stdlib_corpus():
    return data.load_corpus(_data_cfg(), 256)


def _crc32(buf: bytes) -> int:
    """CRC-32 (IEEE 802.3, zlib's), bit by bit from its definition: the
    reference for the split's bucket, independent of the code under test."""
    crc = 0xFFFFFFFF
    for byte in buf:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_val_split_is_the_crc32_bucket_of_the_file_name():
    """A file is validation iff crc32(relative path, '/'-separated) % 10000
    < val_percent * 100: fixed by the name, on any machine."""
    assert _crc32(b"123456789") == 0xCBF43926  # the standard CRC-32 check value
    names = ["json/decoder.py", "doctest.py", "os.py", "collections/__init__.py"]
    buckets = {n: _crc32(n.encode()) % 10_000 for n in names}
    is_val = {n: data._is_val_file(n, 2.0) for n in names}
    assert is_val == {n: b < 200 for n, b in buckets.items()}
    assert set(is_val.values()) == {True, False}  # the names cover both sides
    for n, b in buckets.items():
        # The threshold moves the file exactly at its bucket (half a bucket
        # either side, clear of float rounding in val_percent * 100).
        assert not data._is_val_file(n, (b - 0.5) / 100)
        assert data._is_val_file(n, (b + 0.5) / 100)


def test_stdlib_corpus_is_split_by_file_and_fixed(stdlib_corpus):
    c = stdlib_corpus
    assert c.vocab_size == 256 and c.train.dtype == np.uint8
    assert len(c.train) > 5_000_000 and 0.005 < len(c.val) / len(c.train) < 0.05
    root = data.stdlib_root()
    assert "site-packages" not in root
    files = data._list_files(root, "*.py", ("site-packages", "dist-packages", "__pycache__"))
    assert not any("site-packages" in f for f in files)
    val_files = [f for f in files if _crc32(f.encode()) % 10_000 < 200]
    assert 0 < len(val_files) < len(files) / 10
    # The validation split is exactly the validation files' bytes, in
    # listing order (files over the size cap are left out of both splits).
    val_bytes = []
    for f in val_files:
        path = os.path.join(root, f)
        if os.path.getsize(path) <= data._MAX_FILE_BYTES:
            with open(path, "rb") as fh:
                val_bytes.append(fh.read())
    assert len(val_bytes) > 0
    assert c.val.tobytes() == b"".join(val_bytes)
    # Every other file is training data, each exactly once.
    train_files = sorted(set(files) - set(val_files))
    sizes = [os.path.getsize(os.path.join(root, f)) for f in train_files]
    assert len(c.train) == sum(s for s in sizes if s <= data._MAX_FILE_BYTES)


def test_text_folder_and_file(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(200):
        (folder / f"f{i:03d}.txt").write_bytes(f"document {i}\n".encode() * 20)
    c = data.load_corpus(_data_cfg(source="text", path=str(folder), val_percent=10.0), 256)
    assert len(c.val) > 0 and len(c.train) > len(c.val)
    assert len(c.train) + len(c.val) == sum(len(f"document {i}\n") * 20 for i in range(200))
    one = tmp_path / "one.txt"
    one.write_bytes(bytes(range(256)) * 40)
    c = data.load_corpus(_data_cfg(source="text", path=str(one), val_percent=10.0), 256)
    assert len(c.val) == 1024 and np.array_equal(c.train[:256], np.arange(256))


@pytest.mark.parametrize("suffix,dtype", [(".npy", np.uint16), (".bin", np.uint16),
                                          (".bin", np.uint32)])
def test_token_files_are_memory_mapped(tmp_path, suffix, dtype):
    tokens = (np.arange(10_000) * 7 % 50_000).astype(dtype)
    path = str(tmp_path / f"tok{suffix}")
    if suffix == ".npy":
        np.save(path, tokens)
    else:
        tokens.tofile(path)
    cfg = _data_cfg(source="tokens", path=path, dtype=np.dtype(dtype).name, val_percent=10.0)
    c = data.load_corpus(cfg, 50_000)
    assert isinstance(c.train, np.memmap)
    assert np.array_equal(np.concatenate([c.train, c.val]), tokens)
    with pytest.raises(ValueError, match="vocab_size"):
        data.load_corpus(cfg, 1000)


@pytest.mark.parametrize("cfg,match", [
    (dict(source="text", path="/no/such/path"), "config.data.path"),
    (dict(source="tokens", path="/no/such.bin"), "config.data.path"),
    (dict(source="web"), "config.data.source"),
])
def test_bad_data_config_names_the_field(cfg, match):
    with pytest.raises(ValueError, match=match):
        data.load_corpus(_data_cfg(**cfg), 256)


def test_train_iterator_is_deterministic_and_resumable():
    tokens = np.arange(100_000, dtype=np.uint16)
    kw = dict(seq_len=16, global_batch=8, seed=3)
    a = data.train_iterator(tokens, **kw)
    first = [next(a) for _ in range(5)]
    state = a.get_state()
    rest = [next(a) for _ in range(5)]
    b = data.train_iterator(tokens, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(first, [next(b) for _ in range(5)]))
    c = data.train_iterator(tokens, **kw)
    c.set_state(state)  # a fresh iterator restored to batch 5: nothing repeated or skipped
    assert all(np.array_equal(x, y) for x, y in zip(rest, [next(c) for _ in range(5)]))
    # Rows are windows of seq_len+1 consecutive tokens starting at multiples of seq_len.
    x = first[0]
    assert x.shape == (8, 17) and x.dtype == np.int32
    assert np.all(np.diff(x, axis=1) == 1) and np.all(x[:, 0] % 16 == 0)
    # A different seed gives a different order.
    d = data.train_iterator(tokens, seq_len=16, global_batch=8, seed=4)
    assert not np.array_equal(next(d), first[0])


def test_epochs_cover_every_window_once():
    tokens = np.arange(16 * 12 + 1, dtype=np.uint16)  # 12 windows
    it = data.train_iterator(tokens, seq_len=16, global_batch=4, seed=0)
    epoch = np.concatenate([next(it)[:, 0] for _ in range(3)])
    assert sorted(epoch // 16) == list(range(12))
    epoch2 = np.concatenate([next(it)[:, 0] for _ in range(3)])
    assert sorted(epoch2 // 16) == list(range(12)) and not np.array_equal(epoch, epoch2)


def test_local_rows_follow_the_batch_sharding():
    mesh = jax.make_mesh((2, 4), ("data", "expert"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharding = NamedSharding(mesh, P(("data", "expert")))
    rows = data.local_rows(sharding, 16, 8)
    assert list(rows) == list(range(16))  # one process holds every row
    tokens = np.arange(10_000, dtype=np.uint16)
    it = data.train_iterator(tokens, seq_len=8, global_batch=16, seed=0, local_rows=rows[::2])
    full = data.train_iterator(tokens, seq_len=8, global_batch=16, seed=0)
    assert np.array_equal(next(it), next(full)[::2])
    arr = data.to_global(next(full), sharding, 16)
    assert arr.shape == (16, 9) and arr.sharding == sharding


def test_eval_batches_are_fixed():
    tokens = np.arange(5_000, dtype=np.uint16)
    a = data.eval_batches(tokens, seq_len=16, global_batch=4, num_batches=3)
    b = data.eval_batches(tokens, seq_len=16, global_batch=4, num_batches=3)
    assert len(a) == 3 and all(np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="val_percent"):
        data.eval_batches(tokens[:10], seq_len=16, global_batch=4, num_batches=1)
