"""Features on disk: one ``.npy`` file per layer, shape (N, D), filled batch by batch, and a progress record.

The files are created at full size up front (``layer_{l}.npy``, numpy's format, so ``np.load(...,
mmap_mode="r")`` maps them), written through ordinary file handles (written pages belong to the page
cache, not to the process), and after every batch the files are flushed to disk and ``progress.json``
(the key, the shapes, how many images are done) is replaced atomically. A store is therefore always in one
of three states: complete (``done == n``), part-way (an extraction stopped or was killed: it continues
from ``done``), or unusable (a file shorter than its shape, a header that does not match, a record of
other inputs): then it is rebuilt. Nothing is read as complete unless the record says so and every file
has its full size. A write that fails (a full disk, a quota, a file-size limit) is one line saying how much
the store needs, and leaves the record naming only the rows made durable before it.

Readers get a ``LayerFeatures`` mapping that maps one layer's file when it is indexed, so a probe holds
one layer at a time.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from igpt.arrays import load_npy
from igpt.atomic import read_json, write_error, write_json

log = logging.getLogger(__name__)
DTYPES = {"fp16": np.float16, "fp32": np.float32}
PROGRESS = "progress.json"


def _layer_file(path: Path, layer: int) -> Path:
    return path / f"layer_{layer}.npy"


def _header_length(f: BinaryIO, n: int, d: int, dtype: np.dtype) -> int | None:
    """Bytes before the data of an .npy file holding (n, d) ``dtype``, or None when its header differs."""
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, found = read(f)
    except (ValueError, OSError, SyntaxError):
        return None
    if tuple(shape) != (n, d) or fortran or np.dtype(found) != dtype:
        return None
    return f.tell()


class FeatureStore:
    """The features of one split, on disk at ``path`` (a directory)."""

    def __init__(self, path: str | Path, n: int, d: int, layers: list[int], feats_dtype: str, key: str) -> None:
        self.path, self.n, self.d, self.layers = Path(path), n, d, sorted(layers)
        self.dtype, self.feats_dtype, self.key = np.dtype(DTYPES[feats_dtype]), feats_dtype, key
        self._handles: dict[int, BinaryIO] = {}
        self._offsets: dict[int, int] = {}

    # ---- state on disk

    def _record(self, done: int) -> dict[str, Any]:
        return {"key": self.key, "n": self.n, "d": self.d, "layers": self.layers, "dtype": self.feats_dtype,
                "done": done}

    def _intact_offsets(self) -> dict[int, int] | None:
        """{layer: data offset} when every layer file exists with its header and full size, else None."""
        offsets = {}
        for layer in self.layers:
            path = _layer_file(self.path, layer)
            try:
                with open(path, "rb") as f:
                    offset = _header_length(f, self.n, self.d, self.dtype)
                size = path.stat().st_size
            except OSError:
                return None
            if offset is None or size != offset + self.n * self.d * self.dtype.itemsize:
                return None
            offsets[layer] = offset
        return offsets

    def done(self) -> int | None:
        """Images already written (0..n), or None when the store is missing, damaged or of other inputs."""
        try:
            record = read_json(self.path / PROGRESS)
        except (OSError, ValueError):
            return None
        expected = self._record(record.get("done", -1) if isinstance(record, dict) else -1)
        if record != expected or not 0 <= expected["done"] <= self.n:
            return None
        offsets = self._intact_offsets()
        if offsets is None:
            log.warning("%s: a feature file is truncated or damaged; extracting again", self.path)
            return None
        self._offsets = offsets
        return int(expected["done"])

    def create(self) -> None:
        """A fresh, empty store (anything at ``path`` is removed first)."""
        shutil.rmtree(self.path, ignore_errors=True)
        with self._writing():
            self.path.mkdir(parents=True)
            for layer in self.layers:
                mm = np.lib.format.open_memmap(_layer_file(self.path, layer), mode="w+", dtype=self.dtype,
                                               shape=(self.n, self.d))
                self._offsets[layer] = int(mm.offset)
                del mm  # sparse: the file has its full size without writing the zeros
            write_json(self.path / PROGRESS, self._record(0))  # last: a store cut short above has no record

    # ---- writing

    def nbytes(self) -> int:
        """The bytes of the features at full size (every layer's N x D values)."""
        return self.n * self.d * self.dtype.itemsize * len(self.layers)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed write as one line (``no space left writing ...: N MB needed``); ``commit`` has not run, so
        the record still names only what was durable before."""
        try:
            yield
        except OSError as e:
            raise write_error(e, self.path, self.nbytes()) from e

    def __enter__(self) -> "FeatureStore":
        self._handles = {layer: open(_layer_file(self.path, layer), "r+b") for layer in self.layers}
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        handles, self._handles = self._handles, {}
        failed = []
        for f in handles.values():  # closing flushes what is buffered, which can fail as a write does
            try:
                f.close()
            except OSError as e:
                failed.append(e)
        if failed and exc_type is None:  # otherwise the error already on its way says it
            raise write_error(failed[0], self.path, self.nbytes()) from failed[0]

    def write(self, start: int, feats: Mapping[int, np.ndarray]) -> None:
        """Rows ``start, start + 1, ...`` of every layer (feats {layer: (B, D)})."""
        row = self.d * self.dtype.itemsize
        with self._writing():
            for layer in self.layers:
                f = self._handles[layer]
                f.seek(self._offsets[layer] + start * row)
                f.write(np.ascontiguousarray(feats[layer], dtype=self.dtype).tobytes())

    def commit(self, done: int) -> None:
        """Make the rows written so far durable, then record that the first ``done`` images are in."""
        with self._writing():
            for f in self._handles.values():
                f.flush()
                os.fsync(f.fileno())
            write_json(self.path / PROGRESS, self._record(done))

    # ---- reading

    def features(self) -> "LayerFeatures":
        return LayerFeatures(self.path, self.layers)


class LayerFeatures(Mapping[int, np.ndarray]):
    """{layer: (N, D) read-only memory map} of a store, mapping a layer's file only when it is indexed."""

    def __init__(self, path: Path, layers: list[int]) -> None:
        self.path, self._layers = Path(path), list(layers)

    def __getitem__(self, layer: int) -> np.ndarray:
        if layer not in self._layers:
            raise KeyError(layer)
        return load_npy(_layer_file(self.path, layer), mmap=True)

    def __iter__(self) -> Iterator[int]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        return f"LayerFeatures({str(self.path)!r}, layers={self._layers})"
