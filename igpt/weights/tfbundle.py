"""A reader for TensorFlow's tensor-bundle checkpoints (TF1 ``Saver`` V2, TF2 checkpoints), without TensorFlow.

OpenAI released the image-gpt weights in this format (``model.ckpt-STEP.index`` plus
``model.ckpt-STEP.data-XXXXX-of-NNNNN`` shards). Reading them needs no 600 MB TensorFlow install:

- The ``.index`` file is an SSTable (LevelDB's table format, which TensorFlow copies): data blocks, a
  meta-index block, an index block and a 48-byte footer (two block handles, padding, the 8-byte magic
  ``0xdb4775248b80fb57``). Each block ends with a 5-byte trailer: a compression byte (TensorFlow writes
  bundles uncompressed; 0 is the only value we accept) and the masked CRC32C of the block plus that byte.
  Block entries are prefix-compressed ``(shared, unshared, value_length)`` varints, then the key suffix and
  the value; the block ends with its restart offsets, which a full scan does not need.
- Under the empty key sits a ``BundleHeaderProto`` (1 num_shards, 2 endianness); every other key is a
  tensor name whose value is a ``BundleEntryProto`` (1 dtype, 2 shape, 3 shard_id, 4 offset, 5 size,
  6 masked crc32c, 7 slices). We decode these protobufs with a few lines of varint parsing.
- The data shards hold each tensor's raw little-endian bytes at ``offset`` in shard ``shard_id``.

Every index block and every tensor read is checked against its CRC32C. A pure-Python CRC runs at a few MB/s,
too slow for the 5 GB iGPT-L shards, so long buffers are cut into up to 65,536 equal lanes that numpy
advances together, and the lane CRCs are merged with CRC's linearity (shifting a CRC register past n zero
bytes is a linear map over GF(2)); iGPT-S's 300 MB verify in a few seconds on two cores.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_MAGIC = 0xDB4775248B80FB57
_FOOTER_LEN = 48  # two varint block handles padded to 40 bytes, then the fixed64 magic
_BLOCK_TRAILER = 5  # compression type byte + masked crc32c
_MASK_DELTA = 0xA282EAD8

# tensorflow/core/framework/types.proto ids of the dtypes we can read as raw bytes.
_DTYPES: dict[int, np.dtype] = {1: np.dtype("<f4"), 2: np.dtype("<f8"), 3: np.dtype("<i4"), 4: np.dtype("u1"),
                                5: np.dtype("<i2"), 6: np.dtype("i1"), 9: np.dtype("<i8"), 10: np.dtype("?"),
                                19: np.dtype("<f2")}
_DTYPE_NAMES = {7: "string", 8: "complex64", 14: "bfloat16", 18: "complex128", 20: "resource", 21: "variant"}


# ---- CRC32C (Castagnoli), as TensorFlow uses it ----

def _make_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()
_TABLE_NP = np.array(_TABLE, dtype=np.uint32)
_SERIAL_MAX = 1 << 16  # below this many bytes the plain loop is fast enough


def _crc_update(reg: int, data: bytes) -> int:
    """Advance a reflected CRC32C register over data, without the initial or final inversion."""
    t = _TABLE
    for b in data:
        reg = t[(reg ^ b) & 0xFF] ^ (reg >> 8)
    return reg


def _apply(op: list[int], v: int) -> int:
    """A 32x32 GF(2) matrix, given as the images of the 32 unit vectors, applied to v."""
    out, i = 0, 0
    while v:
        if v & 1:
            out ^= op[i]
        v >>= 1
        i += 1
    return out


def _zeros_op(n_bytes: int) -> list[int]:
    """The linear map that advances a register past n_bytes zero bytes, by repeated squaring."""
    one = [_TABLE[(1 << i) & 0xFF] ^ ((1 << i) >> 8) for i in range(32)]
    result = [1 << i for i in range(32)]
    while n_bytes:
        if n_bytes & 1:
            result = [_apply(one, v) for v in result]
        one = [_apply(one, v) for v in one]
        n_bytes >>= 1
    return result


def _op_tables(op: list[int]) -> np.ndarray:
    """(4, 256) uint32 tables so that op(r) = T0[r & 255] ^ T1[(r >> 8) & 255] ^ T2[...] ^ T3[r >> 24]."""
    b = np.arange(256, dtype=np.uint32)
    tables = np.zeros((4, 256), dtype=np.uint32)
    for k in range(4):
        for bit in range(8):
            tables[k] ^= np.where(b & (1 << bit), np.uint32(op[8 * k + bit]), np.uint32(0))
    return tables


def _apply_tables(t: np.ndarray, r: np.ndarray) -> np.ndarray:
    return t[0][r & 255] ^ t[1][(r >> 8) & 255] ^ t[2][(r >> 16) & 255] ^ t[3][r >> 24]


def crc32c(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """CRC32C of a byte buffer (``crc32c(b"123456789") == 0xE3069283``)."""
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    if buf.size < _SERIAL_MAX:
        return _crc_update(0xFFFFFFFF, buf.tobytes()) ^ 0xFFFFFFFF
    lanes = 1 << min(16, int(math.log2(buf.size // 64)))
    span = buf.size // lanes
    rows = np.ascontiguousarray(buf[: lanes * span].reshape(lanes, span).T)  # (span, lanes): one step a row
    rows[:4, 0] ^= 0xFF  # the initial register 0xFFFFFFFF equals XORing it into the first 4 message bytes
    reg = np.zeros(lanes, dtype=np.uint32)
    for row in rows:
        reg = _TABLE_NP[(reg ^ row) & 0xFF] ^ (reg >> 8)
    # Merge neighbouring lanes: crc(A || B) = shift(crc(A), len(B)) ^ crc(B) for zero-initialised registers.
    op = _zeros_op(span)
    while reg.size > 1:
        reg = _apply_tables(_op_tables(op), reg[0::2]) ^ reg[1::2]
        op = [_apply(op, v) for v in op]  # the next level merges spans twice as long
    tail = buf[lanes * span:].tobytes()
    return _crc_update(int(reg[0]), tail) ^ 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    """TensorFlow and LevelDB store CRCs 'masked' (rotated and offset) so CRCs of CRCs stay distinct."""
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ---- protobuf wire format and the SSTable ----

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message: ints for varint/fixed fields, bytes for the rest."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        yield number, value


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


@dataclass(frozen=True)
class BundleEntry:
    """Where one tensor lives: its dtype id, shape, shard, byte range and (unmasked) CRC32C."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None
    sliced: bool

    @classmethod
    def parse(cls, name: str, buf: bytes) -> BundleEntry:
        f: dict[str, int | None] = dict(dtype=0, shard_id=0, offset=0, size=0, crc32c=None)
        shape: list[int] = []
        sliced = False
        for number, value in _fields(buf):
            if number == 2:  # TensorShapeProto: repeated Dim (field 2) {1: size, 2: name}; size 0 is omitted
                shape = [_signed64(int(dict(_fields(dim)).get(1, 0)))  # type: ignore[arg-type]
                         for n, dim in _fields(value) if n == 2]  # type: ignore[arg-type]
            elif number == 7:
                sliced = True
            elif number in (1, 3, 4, 5, 6):
                key = {1: "dtype", 3: "shard_id", 4: "offset", 5: "size", 6: "crc32c"}[number]
                f[key] = int(value)  # type: ignore[arg-type]
        crc = f["crc32c"]
        return cls(name, int(f["dtype"] or 0), tuple(shape), int(f["shard_id"] or 0), int(f["offset"] or 0),
                   int(f["size"] or 0), None if crc is None else unmask_crc(crc), sliced)

    @property
    def dtype_name(self) -> str:
        return str(_DTYPES[self.dtype]) if self.dtype in _DTYPES else _DTYPE_NAMES.get(self.dtype, f"#{self.dtype}")


def _block(data: bytes, offset: int, size: int, where: str) -> bytes:
    if offset + size + _BLOCK_TRAILER > len(data):
        raise ValueError(f"{where}: block at byte {offset} runs past the end of the file (truncated?)")
    contents = data[offset:offset + size]
    kind = data[offset + size]
    (stored,) = struct.unpack_from("<I", data, offset + size + 1)
    if unmask_crc(stored) != crc32c(contents + bytes([kind])):
        raise ValueError(f"{where}: block at byte {offset} fails its CRC32C check (corrupt file)")
    if kind != 0:
        raise ValueError(f"{where}: block at byte {offset} is compressed (type {kind}); only uncompressed "
                         "bundles (what TensorFlow writes) are supported")
    return contents


def _block_items(block: bytes, where: str) -> Iterator[tuple[bytes, bytes]]:
    if len(block) < 4:
        raise ValueError(f"{where}: malformed block")
    (n_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * n_restarts
    if end < 0:
        raise ValueError(f"{where}: malformed block")
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        n_value, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + n_value]
        pos += n_value


def read_index(path: Path) -> dict[bytes, bytes]:
    """Every (key, value) of an SSTable file, in key order."""
    data = path.read_bytes()
    where = str(path)
    if len(data) < _FOOTER_LEN or int.from_bytes(data[-8:], "little") != _MAGIC:
        raise ValueError(f"{where} is not a TensorFlow checkpoint index (no SSTable magic at its end)")
    footer = data[-_FOOTER_LEN:]
    _, pos = _varint(footer, 0)  # meta-index handle: offset,
    _, pos = _varint(footer, pos)  # size (unused: bundles have no filter blocks)
    index_off, pos = _varint(footer, pos)
    index_size, _ = _varint(footer, pos)
    out: dict[bytes, bytes] = {}
    for _, handle in _block_items(_block(data, index_off, index_size, where), where):
        off, p = _varint(handle, 0)
        size, _ = _varint(handle, p)
        out.update(_block_items(_block(data, off, size, where), where))
    return out


def resolve_prefix(path: str | Path) -> Path:
    """The checkpoint prefix from ``model.ckpt-STEP``, ``model.ckpt-STEP.index`` or a folder with one index."""
    p = Path(path)
    if p.name.endswith(".index") and p.is_file():
        return p.with_name(p.name[: -len(".index")])
    if p.is_dir():
        found = sorted(p.glob("*.index"))
        if len(found) != 1:
            what = "no" if not found else f"{len(found)}"
            raise ValueError(f"{p} holds {what} *.index files; pass the checkpoint prefix "
                             "(e.g. {p}/model.ckpt-1000000)")
        return found[0].with_name(found[0].name[: -len(".index")])
    if p.with_name(p.name + ".index").is_file():
        return p
    raise FileNotFoundError(f"TensorFlow checkpoint {p}.index does not exist")


class TensorBundle:
    """``TensorBundle(prefix)``: ``.entries`` {name: BundleEntry}, ``.shapes``, ``read(name)`` -> ndarray."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = resolve_prefix(prefix)
        self.index_path = self.prefix.with_name(self.prefix.name + ".index")
        items = read_index(self.index_path)
        if b"" not in items:
            raise ValueError(f"{self.index_path}: no bundle header (empty key); not a tensor bundle")
        header = dict(_fields(items.pop(b"")))
        self.num_shards = int(header.get(1, 1))  # type: ignore[arg-type]
        if int(header.get(2, 0)) != 0:  # type: ignore[arg-type]
            raise ValueError(f"{self.index_path}: big-endian bundles are not supported")
        self.entries = {k.decode(): BundleEntry.parse(k.decode(), v) for k, v in items.items()}
        for shard_id in sorted({e.shard_id for e in self.entries.values()}):  # fail now, not mid-conversion
            if not self.shard_path(shard_id).is_file():
                raise FileNotFoundError(f"data shard {self.shard_path(shard_id)} (listed in {self.index_path}) "
                                        "does not exist")

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: e.shape for name, e in self.entries.items()}

    def shard_path(self, shard_id: int) -> Path:
        return self.prefix.with_name(f"{self.prefix.name}.data-{shard_id:05d}-of-{self.num_shards:05d}")

    def read(self, name: str, verify: bool = True) -> np.ndarray:
        """The tensor ``name`` as a numpy array of its stored dtype (CRC32C-checked unless verify=False)."""
        if name not in self.entries:
            raise KeyError(f"{self.index_path}: no tensor {name!r}")
        e = self.entries[name]
        if e.sliced:
            raise ValueError(f"{self.index_path}: tensor {name} is stored as partitioned slices (unsupported)")
        if e.dtype not in _DTYPES:
            raise ValueError(f"{self.index_path}: tensor {name} has dtype {e.dtype_name}, which this reader "
                             "cannot decode")
        dtype = _DTYPES[e.dtype]
        n = math.prod(e.shape)
        if any(s < 0 for s in e.shape) or n * dtype.itemsize != e.size:
            raise ValueError(f"{self.index_path}: tensor {name} of shape {e.shape} and dtype {dtype} should "
                             f"take {n * dtype.itemsize} bytes, the index says {e.size}")
        shard = self.shard_path(e.shard_id)
        if not shard.is_file():
            raise FileNotFoundError(f"data shard {shard} (holding tensor {name}) does not exist")
        out = np.empty(n, dtype=dtype)  # read straight into the array: one copy of the tensor in memory
        with open(shard, "rb") as f:
            f.seek(e.offset)
            got = f.readinto(memoryview(out).cast("B"))
        if got != e.size:
            raise ValueError(f"{shard}: tensor {name} needs bytes {e.offset}..{e.offset + e.size}, the file "
                             "ends first (truncated download?)")
        if verify and e.crc32c is not None and crc32c(out) != e.crc32c:
            raise ValueError(f"{shard}: tensor {name} fails its CRC32C check (corrupt download?)")
        return out.reshape(e.shape)
