"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP): every process writes its own part.

A full checkpoint (``igpt.weights.checkpoint``) gathers the whole model and optimizer state on rank 0 first, which
for iGPT-XL (6.8B parameters, 82 GB of fp32 weights and Adam moments) is more than one host should hold.
With ``--sharded-checkpoint`` each process writes only the shards it owns, in parallel, and the files are
keyed by parameter name and global shape, not by process, so a run resumes on any number of processes
(DCP re-slices on load). Layout of a sharded step checkpoint::

    step-0001000/
      config.json         the record, with "sharded": true (its declared kind) and "saved_by_processes"
      palette.npz
      train_state.json    step, data position and RNG state (the optimizer is in the shards),
      train_state.safetensors   as in a full checkpoint
      sharded/            DCP files: .metadata and one __<rank>_<n>.distcp per writing process
                          {"model": name-keyed weights, "optim": name-keyed Adam state}

``igpt.load`` reads it directly in one process; ``igpt convert --consolidate`` turns it into a single
``model.safetensors`` checkpoint. As with full checkpoints the directory is assembled under a temporary
name and renamed into place (under torchrun that name must be on a filesystem every node sees).

DCP's own reader would run code from a tampered checkpoint: it reads ``.metadata`` with ``pickle.load``,
every non-tensor item (the optimizer's ``param_groups``) with ``torch.load(weights_only=False)``, and,
before torch 2.6, the tensors with an unrestricted ``torch.load`` too. Here ``.metadata`` goes through
``MetadataUnpickler``, which rebuilds DCP's metadata classes and nothing else, and every item through
``torch.load(weights_only=True)`` (tensors, numbers, strings, tuples, lists, dicts).
"""

from __future__ import annotations

import functools
import io
import math
import pickle
import shutil
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from igpt.atomic import move_into_place, write_error
from igpt.distributed import World, barrier
from igpt.tensorfile import nonfinite
from igpt.weights.tensors import nbytes, unreadable

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

SHARDS, METADATA = "sharded", ".metadata"  # DCP's name for its index of the shards

# Every global a DCP .metadata pickle names (found by listing the find_class calls that reading our sharded
# checkpoints makes): the metadata dataclasses and the enum TensorProperties stores its memory format as,
# _StorageInfo (where each item's bytes lie), torch.Size, the dtypes, and torch's layout lookup by name.
_METADATA_GLOBALS = {("torch.distributed.checkpoint.metadata", name) for name in (
    "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
    "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout")}
_DTYPES = {name for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
# StorageMeta.checkpoint_id is the path it was saved to; as a pure path it never touches the filesystem,
# and a checkpoint written on another OS still reads.
_PATHS = {"PosixPath": PurePosixPath, "PurePosixPath": PurePosixPath, "WindowsPath": PureWindowsPath,
          "PureWindowsPath": PureWindowsPath}


def _no_dist() -> bool:
    """DCP's single-process mode: no process group to coordinate through."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def save_sharded(ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World,
                 write_rest: Any) -> None:
    """Collective: every rank writes its shards of the model and optimizer into ``ckpt_dir/sharded``;
    rank 0 then calls ``write_rest(tmp_dir)`` for the small files and renames the directory into place."""
    tmp = ckpt_dir.with_name(f".{ckpt_dir.name}.tmp-sharded")  # one name that every rank agrees on
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir(parents=True)
    barrier(world)
    d = _dcp()
    state = {"model": d.get_model_state_dict(model), "optim": d.get_optimizer_state_dict(model, optimizer)}
    try:
        d.dcp.save(state, checkpoint_id=tmp / SHARDS, no_dist=_no_dist())
        barrier(world)  # every rank's shard is on disk before the directory becomes visible
        if world.is_main:
            write_rest(tmp)
            move_into_place(tmp, ckpt_dir)
    # CheckpointException derives from BaseException, so it is named: DCP wraps every rank's failure in it
    except (Exception, d.CheckpointException) as e:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        cause = _failure(e)
        if not isinstance(cause, Exception):  # a KeyboardInterrupt or SystemExit inside DCP stays one
            raise cause from e
        raise write_error(cause, ckpt_dir, nbytes(state)) from e
    barrier(world)


class MetadataUnpickler(pickle.Unpickler):
    """Rebuilds DCP's metadata and nothing else: any global outside ``_METADATA_GLOBALS``, the dtypes and
    the path classes (a function such as os.system, any class that runs code as it is built) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and name in _DTYPES):
            return super().find_class(module, name)
        if module == "pathlib" and name in _PATHS:
            return _PATHS[name]
        raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP metadata never holds: refused, "
                                     "nothing in it was run")


class _FileError(ValueError):
    """A one-line error that already names the file it is about."""


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


def read_metadata(path: Path) -> Metadata:
    """The DCP index ``path`` (``sharded/.metadata``), unpickled by ``MetadataUnpickler`` and checked to
    point only at files beside it; a one-line ValueError naming it when it is missing, corrupt or hostile."""
    d = _dcp()  # the classes the pickle names must be importable before it is read
    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise _FileError(f"{path} is missing: the sharded checkpoint is incomplete") from None
    except Exception as e:  # a truncated or tampered pickle trips the unpickler in any number of ways
        raise _FileError(f"{path} is not readable DCP metadata: {unreadable(e)}") from e
    if not (isinstance(metadata, d.Metadata) and isinstance(metadata.state_dict_metadata, dict)
            and isinstance(metadata.storage_data, dict)
            and isinstance(metadata.storage_meta, (d.StorageMeta, type(None)))):
        raise _FileError(f"{path} is not DCP metadata (it holds a {type(metadata).__name__})")
    for key, kind in metadata.state_dict_metadata.items():
        if not isinstance(key, str) or not isinstance(kind, (d.TensorStorageMetadata, d.BytesStorageMetadata)):
            raise _FileError(f"{path}: entry {key!r} is a {type(kind).__name__}, not tensor or bytes metadata")
    for index, where in metadata.storage_data.items():
        if not (isinstance(index, d.MetadataIndex) and isinstance(where, d.StorageInfo)
                and _plain_name(where.relative_path)):
            raise _FileError(f"{path}: item {getattr(index, 'fqn', index)!r} points at "
                             f"{getattr(where, 'relative_path', where)!r}, not at a shard file beside it")
    return metadata


@functools.cache
def _dcp() -> SimpleNamespace:
    """``torch.distributed.checkpoint``, and the reader and planner igpt builds on it, imported on first use:
    importing DCP costs more than a second, which every command would otherwise pay, sharded checkpoint or
    not. The classes that extend DCP's are therefore made here, once, rather than at module level."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner.load_bytes uses
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, Metadata, MetadataIndex,
                                                       StorageMeta, TensorStorageMetadata)
    from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.futures import Future

    class Reader(FileSystemReader):
        """DCP's file reader with the metadata read by ``read_metadata`` and every item read here: tensors with
        ``torch.load(weights_only=True)`` (DCP's own reader passes no ``weights_only`` before torch 2.6, so its
        default there unpickles in full), byte items by the planner. A failure is one line naming its shard file."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            rank = kwargs.get("rank")  # newer DCP falls back to per-rank metadata files
            metadata = read_metadata(Path(self.path) / (METADATA if rank is None else f"__{rank}{METADATA}"))
            if metadata.storage_meta is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id  # as FileSystemReader.read_metadata does
            return metadata

        def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
            files: dict[str, list[ReadItem]] = {}
            for item in plan.items:
                files.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
            for name, items in files.items():
                path = Path(self.path) / name
                try:
                    with open(path, "rb") as f:
                        for item in sorted(items, key=lambda it: self.storage_data[it.storage_index].offset):
                            self._read_item(f, item, planner)
                except Exception as e:
                    raise _FileError(f"{path}: {unreadable(e)}") from e
            done: Future = Future()
            done.set_result(None)
            return done

        def _read_item(self, f: Any, item: ReadItem, planner: LoadPlanner) -> None:
            where = self.storage_data[item.storage_index]
            if getattr(where, "transform_descriptors", None):  # compression etc.: never written by igpt
                raise ValueError(f"item {item.storage_index.fqn} is stored with transforms "
                                 f"{list(where.transform_descriptors)}, which igpt does not read")
            f.seek(where.offset)
            blob = f.read(where.length)
            if len(blob) != where.length:
                raise EOFError
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, io.BytesIO(blob))
                return
            tensor = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"item {item.storage_index.fqn} holds a {type(tensor).__name__}, not a tensor")
            for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths)):
                tensor = tensor.narrow(dim, start, length)  # the part of the stored chunk this rank needs
            target = planner.resolve_tensor(item).detach()
            if target.size() != tensor.size():
                raise ValueError(f"item {item.storage_index.fqn} has shape {tuple(tensor.size())} where "
                                 f"{tuple(target.size())} is needed")
            why = nonfinite(item.storage_index.fqn, tensor)  # weights or optimizer moments: NaN in either is lost
            if why is not None:
                raise ValueError(why)
            target.copy_(tensor)
            planner.commit_tensor(item, target)


    class Planner(DefaultLoadPlanner):
        """DefaultLoadPlanner, but a byte item (a non-tensor value: the optimizer's learning rate, betas, flags and
        parameter names) is read by torch's restricted unpickler instead of ``torch.load(weights_only=False)``."""

        def load_bytes(self, read_item: ReadItem, value: Any) -> None:
            try:
                obj = torch.load(value, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"item {read_item.dest_index.fqn}: {unreadable(e)}") from e
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SimpleNamespace(
        dcp=dcp, CheckpointException=CheckpointException, Metadata=Metadata, StorageMeta=StorageMeta,
        MetadataIndex=MetadataIndex, StorageInfo=_StorageInfo, TensorStorageMetadata=TensorStorageMetadata,
        BytesStorageMetadata=BytesStorageMetadata, Reader=Reader, Planner=Planner,
        get_model_state_dict=get_model_state_dict, get_optimizer_state_dict=get_optimizer_state_dict,
        set_model_state_dict=set_model_state_dict, set_optimizer_state_dict=set_optimizer_state_dict)


def _failure(e: BaseException) -> BaseException:
    """The exception inside DCP's CheckpointException (the first failing rank's), or ``e`` itself."""
    if isinstance(e, _dcp().CheckpointException) and e.failures:
        return next(iter(e.failures.values()))[0]
    return e


def model_shapes(ckpt_dir: Path) -> dict[str, tuple[int, ...]]:
    """The model's tensors and their shapes as the index ``sharded/.metadata`` records them, read before
    anything of the shards. The index is a claim like a config: one that records more tensor bytes than
    the shard files hold is refused, so that no model is built to a size the files cannot fill."""
    root = Path(ckpt_dir) / SHARDS
    metadata = read_metadata(root / METADATA)
    tensors = {k: m for k, m in metadata.state_dict_metadata.items() if isinstance(m, _dcp().TensorStorageMetadata)}
    try:
        shapes = {k: tuple(int(n) for n in m.size) for k, m in tensors.items()}
        claimed = sum(math.prod(shapes[k]) * m.properties.dtype.itemsize for k, m in tensors.items())
    except (TypeError, ValueError, AttributeError) as e:
        raise _FileError(f"{root / METADATA}: a tensor's size or dtype is not one: {e}") from None
    held = sum(p.stat().st_size for p in root.iterdir() if p.is_file())
    if claimed > held:
        raise _FileError(f"{root / METADATA} records {claimed} bytes of tensors, but the files beside it hold "
                         f"{held}: it does not describe them")
    return {k.removeprefix("model."): shape for k, shape in shapes.items() if k.startswith("model.")}


def load_sharded(ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Collective: fill ``model`` (plain, DDP-replicated or FSDP-sharded) and ``optimizer`` from a sharded
    checkpoint written by any number of processes. A tensor missing from the checkpoint is an error."""
    root = Path(ckpt_dir) / SHARDS
    read_metadata(root / METADATA)  # a bad index fails here in one line, before DCP logs its own retries
    d = _dcp()
    state: dict[str, Any] = {"model": d.get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = d.get_optimizer_state_dict(model, optimizer)
    try:
        with warnings.catch_warnings():  # DCP warns that a single process is assumed, which is the point
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            d.dcp.load(state, storage_reader=d.Reader(root), planner=d.Planner(), no_dist=_no_dist())
    # CheckpointException derives from BaseException, so it is named: DCP wraps every rank's failure in it
    except (Exception, d.CheckpointException) as e:
        cause = _failure(e)
        if not isinstance(cause, Exception):  # a KeyboardInterrupt or SystemExit inside DCP stays one
            raise cause from e
        if isinstance(cause, _FileError):
            raise ValueError(str(cause)) from e
        raise ValueError(f"{root}: cannot load this sharded checkpoint into the model: "
                         f"{unreadable(cause)}") from e
    d.set_model_state_dict(model, state["model"])
    if optimizer is not None:
        d.set_optimizer_state_dict(model, optimizer, state["optim"])
