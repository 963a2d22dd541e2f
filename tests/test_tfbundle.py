"""igpt.weights.tfbundle against checkpoints written by real TensorFlow (tests/fixtures/openai_tiny, made by
scripts/make_tf_fixture.py) and against a hand-built SSTable for the paths those files do not take."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import OPENAI_AR as AR
from conftest import OPENAI_BERT as BERT
from conftest import tf_arrays as expected

from igpt.weights.tfbundle import TensorBundle, _crc_update, crc32c, read_index, resolve_prefix, unmask_crc


def test_crc32c_known_value_and_parallel_path_agrees_with_serial():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"") == 0
    rng = np.random.default_rng(0)
    for n in (1 << 16, (1 << 16) + 3, 300_001, (1 << 20) + 12345):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(data) == _crc_update(0xFFFFFFFF, data) ^ 0xFFFFFFFF, n
        flipped = bytearray(data)
        flipped[n // 2] ^= 1
        assert crc32c(bytes(flipped)) != crc32c(data)


@pytest.mark.parametrize("prefix", [AR, BERT], ids=["ar", "bert"])
def test_reads_every_tensor_tensorflow_wrote(prefix):
    bundle = TensorBundle(prefix)
    want = expected(prefix)
    assert set(bundle.entries) == set(want)
    assert bundle.num_shards == 2 and {e.shard_id for e in bundle.entries.values()} == {0, 1}
    for name, value in want.items():
        got = bundle.read(name)
        assert got.dtype == value.dtype and got.shape == value.shape, name
        np.testing.assert_array_equal(got, value, err_msg=name)
        assert bundle.entries[name].crc32c is not None  # every tensor was checked, not skipped
    assert int(bundle.read("global_step")) == int(prefix.name.split("-")[1])
    assert ("model/sos" in bundle.entries) == (prefix == AR)


def test_prefix_forms(tmp_path):
    assert resolve_prefix(AR) == AR
    assert resolve_prefix(str(AR) + ".index") == AR
    assert resolve_prefix(AR.parent) == AR
    with pytest.raises(FileNotFoundError, match="nope.index"):
        resolve_prefix(tmp_path / "nope")
    with pytest.raises(ValueError, match="no \\*.index"):
        resolve_prefix(tmp_path)


def copy_fixture(tmp_path: Path) -> Path:
    shutil.copytree(AR.parent, tmp_path / "ar")
    return tmp_path / "ar" / AR.name


def test_corrupt_shard_is_caught_by_crc(tmp_path):
    prefix = copy_fixture(tmp_path)
    bundle = TensorBundle(prefix)
    e = bundle.entries["model/wte"]
    shard = bundle.shard_path(e.shard_id)
    raw = bytearray(shard.read_bytes())
    raw[e.offset + 5] ^= 0x40
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="model/wte fails its CRC32C"):
        bundle.read("model/wte")
    assert not np.array_equal(bundle.read("model/wte", verify=False), expected(AR)["model/wte"])
    np.testing.assert_array_equal(bundle.read("model/wpe"), expected(AR)["model/wpe"])  # others unharmed


def test_missing_and_truncated_shards_are_named(tmp_path):
    prefix = copy_fixture(tmp_path)
    bundle = TensorBundle(prefix)
    e = bundle.entries["model/wte"]
    shard = bundle.shard_path(e.shard_id)
    shard.write_bytes(shard.read_bytes()[: e.offset + 3])
    with pytest.raises(ValueError, match=f"{shard.name}.*model/wte.*ends first"):
        bundle.read("model/wte")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        bundle.read("model/wte")
    with pytest.raises(FileNotFoundError, match=f"data shard .*{shard.name}"):
        TensorBundle(prefix)  # checked when the bundle is opened, before any tensor is read
    with pytest.raises(KeyError, match="no tensor"):
        bundle.read("model/nothing")


def test_bad_index_files(tmp_path):
    prefix = copy_fixture(tmp_path)
    index = prefix.with_name(prefix.name + ".index")
    good = index.read_bytes()
    index.write_bytes(good[:-1] + b"\x00")  # magic broken
    with pytest.raises(ValueError, match="not a TensorFlow checkpoint index"):
        TensorBundle(prefix)
    corrupt = bytearray(good)
    corrupt[20] ^= 0x01  # inside the first data block
    index.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="CRC32C"):
        TensorBundle(prefix)
    index.write_bytes(b"")
    with pytest.raises(ValueError, match=index.name):
        TensorBundle(prefix)


# ---- a hand-built SSTable: several data blocks, prefix-compressed keys, a compressed block ----

def _mask(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _block(items: list[tuple[bytes, bytes]], restart_every: int = 2) -> bytes:
    body, restarts, last = bytearray(), [], b""
    for k, (key, value) in enumerate(items):
        shared = 0
        if k % restart_every:
            while shared < min(len(key), len(last)) and key[shared] == last[shared]:
                shared += 1
        else:
            restarts.append(len(body))
        body += _varint(shared) + _varint(len(key) - shared) + _varint(len(value)) + key[shared:] + value
        last = key
    return bytes(body) + b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))


def _table(blocks: list[list[tuple[bytes, bytes]]], compression: int = 0) -> bytes:
    out, index_items = bytearray(), []
    for items in blocks:
        data = _block(items)
        handle = _varint(len(out)) + _varint(len(data))
        out += data + bytes([compression]) + struct.pack("<I", _mask(crc32c(data + bytes([compression]))))
        index_items.append((items[-1][0], handle))
    meta = _block([])
    meta_handle = _varint(len(out)) + _varint(len(meta))
    out += meta + b"\x00" + struct.pack("<I", _mask(crc32c(meta + b"\x00")))
    index = _block(index_items)
    index_handle = _varint(len(out)) + _varint(len(index))
    out += index + b"\x00" + struct.pack("<I", _mask(crc32c(index + b"\x00")))
    footer = (meta_handle + index_handle).ljust(40, b"\x00") + struct.pack("<Q", 0xDB4775248B80FB57)
    return bytes(out + footer)


def test_hand_built_table_with_several_blocks(tmp_path):
    items = [(f"model/h{i}/attn/q_proj{s}".encode(), bytes([i, len(s)]) * 3) for i in range(7) for s in ("", "/Adam")]
    items.sort()
    path = tmp_path / "t.index"
    path.write_bytes(_table([items[:5], items[5:9], items[9:]]))
    assert list(read_index(path).items()) == items
    path.write_bytes(_table([items[:5], items[5:]], compression=1))  # snappy: TF never writes it for bundles
    with pytest.raises(ValueError, match="compressed"):
        read_index(path)


def test_unmask_inverts_mask():
    for crc in (0, 1, 0xE3069283, 0xFFFFFFFF):
        assert unmask_crc(_mask(crc)) == crc
