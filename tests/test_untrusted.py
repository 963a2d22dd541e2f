"""No file makes igpt run code (docs/reliability.md, "What igpt trusts").

For every kind of file igpt reads, a hostile pickle is planted in its place: unpickled by a full unpickler,
its ``__reduce__`` would call ``open(marker, "w")``. Each file is then read through the front door a user
would take. The marker must never appear, and the file must be refused with a one-line error naming it.
"""

from __future__ import annotations

import io
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import igpt
from conftest import OPENAI_AR, rand_images, write_openai
from igpt.config import FeatureConfig, ModelConfig
from igpt.data.imageset import ImageSet
from igpt.data.open import open_split, prepare
from igpt.eval.features import cached_extract
from igpt.model import GPT
from igpt.tokenizers import Palette
from igpt.record import CheckpointRecord, Finetuned
from igpt.train.pretrain import resume
from igpt.weights.checkpoint import load_train_state, save_checkpoint
from igpt.weights.convert import convert_openai, load_classifier
from igpt.weights.hf import save_hf

CFG = ModelConfig.from_preset("igpt-nano", n_vocab=16, n_px=4)
STEP = Path("checkpoints") / "step-0000002"


class Hostile:
    """Whoever unpickles this with a full unpickler calls open(marker, "w"): the marker appearing means a file
    made igpt run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def as_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Hostile(marker)))


def as_torch(path: Path, marker: Path) -> None:
    torch.save({"weight": Hostile(marker)}, path)


def as_npy(path: Path, marker: Path) -> None:
    with open(path, "wb") as f:  # a handle, so numpy keeps the name as it is
        np.save(f, np.array([Hostile(marker)], dtype=object), allow_pickle=True)


def as_npz(path: Path, marker: Path, *keys: str) -> None:
    with open(path, "wb") as f:
        np.savez(f, **{k: np.array([Hostile(marker)], dtype=object) for k in keys})


# ---- what the files are planted in


def palette16() -> Palette:
    return Palette(torch.rand(16, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1)


def checkpoint(root: Path, finetuned: bool = False) -> Path:
    torch.manual_seed(0)
    model, palette = GPT(CFG), palette16()
    if not finetuned:
        return save_checkpoint(root / "ckpt", model, palette, CheckpointRecord(CFG, palette.fingerprint()))
    record = CheckpointRecord(CFG, palette.fingerprint(), finetuned=Finetuned(2))
    return save_checkpoint(root / "ckpt", model, palette, record, classifier={"head.weight": torch.zeros(2, 32)})


def hf_folder(root: Path) -> Path:
    torch.manual_seed(0)
    palette = palette16()
    return save_hf(GPT(CFG), palette, root / "hf", CheckpointRecord(CFG, palette.fingerprint()))


def hostile_byte_item(shards: Path, marker: Path, tmp: Path) -> None:
    """Rewrite a DCP checkpoint with one optimizer setting (a byte item, not a tensor) made hostile."""
    dcp_to_torch_save(shards, tmp / "whole.pt")  # our own, trusted file: read in full
    state = torch.load(tmp / "whole.pt", weights_only=False)
    state["optim"]["param_groups"][0]["lr"] = Hostile(marker)
    shutil.rmtree(shards)
    dcp.save(state, checkpoint_id=shards, no_dist=True)


def dataset(root: Path) -> Path:
    path = root / "data.npz"
    np.savez(path, x_train=rand_images(20, 8, 8), y_train=np.arange(20) % 2)
    return path


def tar_of(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


# ---- the cases: (front door to call, file planted, path the error must name)


def ckpt_case(name: str, plant):
    def case(tmp: Path, marker: Path, run: Path):
        ckpt = checkpoint(tmp)
        plant(ckpt / name, marker)
        return lambda: igpt.load(ckpt), ckpt / name
    return case


def classifier_case(tmp, marker, run):
    ckpt = checkpoint(tmp, finetuned=True)
    as_pickle(ckpt / "classifier.safetensors", marker)
    return lambda: load_classifier(ckpt), ckpt / "classifier.safetensors"


def train_state_case(name: str, plant, drop_new: bool = False):
    def case(tmp, marker, run):
        ckpt = run / STEP
        if drop_new:  # a run written before train_state.safetensors existed
            for f in ("train_state.safetensors", "train_state.json"):
                (ckpt / f).unlink(missing_ok=True)
        plant(ckpt / name, marker)
        return lambda: load_train_state(ckpt), ckpt / name
    return case


def resume_case(name: str, plant, drop_new: bool = False):
    inner = train_state_case(name, plant, drop_new)

    def case(tmp, marker, run):
        _, path = inner(tmp, marker, run)
        return lambda: resume(run, progress=False), path
    return case


def run_file_case(name: str):
    def case(tmp, marker, run):
        as_pickle(run / name, marker)
        return lambda: resume(run, progress=False), run / name
    return case


def metadata_case(front: str):
    def case(tmp, marker, run):
        as_pickle(run / STEP / "sharded" / ".metadata", marker)
        call = (lambda: igpt.load(run / STEP)) if front == "load" else (lambda: resume(run, progress=False))
        return call, run / STEP / "sharded" / ".metadata"
    return case


def byte_item_case(tmp, marker, run):
    hostile_byte_item(run / STEP / "sharded", marker, tmp)
    return lambda: resume(run, progress=False), run / STEP / "sharded" / "__0_0.distcp"


def tensor_item_case(tmp, marker, run):
    shard = run / STEP / "sharded" / "__0_0.distcp"
    size = shard.stat().st_size
    as_torch(shard, marker)  # the first tensor's bytes become a hostile torch pickle; the length stays
    with open(shard, "ab") as f:
        f.write(b"\0" * max(0, size - shard.stat().st_size))
    return lambda: igpt.load(run / STEP), shard


def hf_case(name: str, plant, named: str | None = None):
    def case(tmp, marker, run):
        hf = hf_folder(tmp)
        if name == "pytorch_model.bin":  # HF's PyTorch format in place of its safetensors
            (hf / "model.safetensors").unlink()
        plant(hf / name, marker)
        return lambda: igpt.load(hf), hf / (named if named is not None else name)
    return case


def openai_case(name: str, plant):
    def case(tmp, marker, run):
        shutil.copytree(OPENAI_AR.parent, tmp / "ar")
        prefix = tmp / "ar" / OPENAI_AR.name
        target = tmp / "ar" / name.replace("PREFIX", prefix.name)
        plant(target, marker)
        return lambda: convert_openai(prefix, tmp / "out"), target
    return case


def palette_case(ext: str, plant):
    def case(tmp, marker, run):
        path = tmp / f"palette{ext}"
        plant(path, marker)
        return lambda: Palette.load(path), path
    return case


def npz_case(plant):
    def case(tmp, marker, run):
        path = tmp / "data.npz"
        plant(path, marker)
        return lambda: open_split(path, "train", n_px=8), path
    return case


def openai_data_case(tag: str):
    def case(tmp, marker, run):
        write_openai(tmp / "c10", {"tr": 4}, t=64)
        as_npy(tmp / f"c10_tr{tag}.npy", marker)
        return lambda: open_split(tmp / "c10", "train", n_px=8), tmp / f"c10_tr{tag}.npy"
    return case


def cifar_case(tmp, marker, run):
    root = tmp / "cifar-10-batches-py"
    root.mkdir()
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        as_pickle(root / name, marker)
    return lambda: open_split(root, "train", n_px=8), root / "data_batch_1"


def stl10_case(tmp, marker, run):
    (tmp / "stl10_binary").mkdir()
    as_pickle(tmp / "stl10_binary" / "train_X.bin", marker)  # raw pixel bytes: a pickle is just bytes here
    return lambda: open_split(tmp / "stl10_binary", "train", n_px=8), tmp / "stl10_binary" / "train_X.bin"


def image_folder_case(tmp, marker, run):
    (tmp / "images").mkdir()
    as_pickle(tmp / "images" / "a.png", marker)
    return lambda: open_split(tmp / "images", "train", n_px=8), tmp / "images" / "a.png"


def cache_case(name: str, plant):
    def case(tmp, marker, run):
        prepare(dataset(tmp), tmp / "cache", n_px=8, progress=False)
        plant(tmp / "cache" / name, marker)
        return lambda: open_split(tmp / "cache", "train", n_px=8), tmp / "cache" / name
    return case


def shards_case(name: str, plant):
    def case(tmp, marker, run):
        prepare(dataset(tmp), tmp / "shards", n_px=8, shards=8, progress=False)
        plant(tmp / "shards" / name, marker)
        return lambda: open_split(tmp / "shards", "train", n_px=8), tmp / "shards" / name
    return case


def webdataset_member_case(tmp, marker, run):
    (tmp / "wds").mkdir()
    tar = tar_of(tmp / "wds" / "train-0.tar", {"a.png": pickle.dumps(Hostile(marker)), "a.cls": b"0"})
    return lambda: open_split(tmp / "wds", "train", n_px=8), tar


def webdataset_tar_case(tmp, marker, run):
    (tmp / "wds").mkdir()
    as_pickle(tmp / "wds" / "train-0.tar", marker)
    return lambda: open_split(tmp / "wds", "train", n_px=8), tmp / "wds" / "train-0.tar"


def features_case(tmp, marker, run):
    torch.manual_seed(0)
    model, palette = GPT(CFG).eval(), palette16()
    images = ImageSet(4, rand_images(2, 4, 4), None, None, None, None, "test")
    cfg = FeatureConfig(device="cpu", dtype="fp32")

    def extract() -> dict:
        return cached_extract(model, images, palette, cfg, split="test", model_identity={}, cache_dir=tmp,
                              progress=False)

    extract()
    (path,) = tmp.glob("feats-*/layer_0.npy")
    as_npy(path, marker)
    return extract, path


CASES = {
    "checkpoint config.json": ckpt_case("config.json", as_pickle),
    "checkpoint model.safetensors": ckpt_case("model.safetensors", as_pickle),
    "checkpoint palette.npz (pickle)": ckpt_case("palette.npz", as_pickle),
    "checkpoint palette.npz (object array)": ckpt_case("palette.npz", lambda p, m: as_npz(p, m, "centers")),
    "classifier.safetensors": classifier_case,
    "train_state.json": train_state_case("train_state.json", as_pickle),
    "train_state.safetensors": train_state_case("train_state.safetensors", as_pickle),
    "legacy train_state.pt": train_state_case("train_state.pt", as_torch, drop_new=True),
    "legacy train_state.pt (raw pickle)": train_state_case("train_state.pt", as_pickle, drop_new=True),
    "resume: train_state.json": resume_case("train_state.json", as_pickle),
    "resume: legacy train_state.pt": resume_case("train_state.pt", as_torch, drop_new=True),
    "resume: run.json": run_file_case("run.json"),
    "resume: metrics.jsonl": run_file_case("metrics.jsonl"),
    "sharded/.metadata via load": metadata_case("load"),
    "sharded/.metadata via resume": metadata_case("resume"),
    "sharded/*.distcp byte item via resume": byte_item_case,
    "sharded/*.distcp tensor item via load": tensor_item_case,
    "hf pytorch_model.bin": hf_case("pytorch_model.bin", as_torch),
    "hf model.safetensors": hf_case("model.safetensors", as_pickle),
    "hf preprocessor_config.json": hf_case("preprocessor_config.json", as_pickle),
    # a config.json that is not JSON does not make the folder a Hugging Face one: the folder is named
    "hf config.json": hf_case("config.json", as_pickle, named=""),
    "openai kmeans_centers.npy": openai_case("kmeans_centers.npy", as_npy),
    "openai tf .index": openai_case("PREFIX.index", as_pickle),
    "openai tf .data": openai_case("PREFIX.data-00000-of-00002", as_pickle),
    "palette .npy": palette_case(".npy", as_npy),
    "palette .npy (pickle)": palette_case(".npy", as_pickle),
    "palette .npz": palette_case(".npz", lambda p, m: as_npz(p, m, "centers")),
    "dataset .npz (pickle)": npz_case(as_pickle),
    "dataset .npz (object array)": npz_case(lambda p, m: as_npz(p, m, "x_train")),
    "openai data _trX.npy": openai_data_case("X"),
    "openai data _trY.npy": openai_data_case("Y"),
    "cifar python pickle": cifar_case,
    "stl-10 binary": stl10_case,
    "image folder file": image_folder_case,
    "cache meta.json": cache_case("meta.json", as_pickle),
    "cache train_pixels.npy": cache_case("train_pixels.npy", as_npy),
    "cache train_labels.npy": cache_case("train_labels.npy", as_npy),
    "shards shards.json": shards_case("shards.json", as_pickle),
    "shards index .idx.npy": shards_case("train-000000.idx.npy", as_npy),
    "webdataset tar member": webdataset_member_case,
    "webdataset tar": webdataset_tar_case,
    "feature cache layer .npy": features_case,
}
NEEDS_RUN = ("train_state", "resume", "sharded")
# metrics.jsonl's last line is dropped with a warning when it is not a record (what a kill in mid-append
# leaves), so a garbage file is read as empty and the resume goes on; what matters is that nothing runs.
# A feature file whose header is not the (N, D) float array its store records is rebuilt, never read.
RECOVERS = {"resume: metrics.jsonl", "feature cache layer .npy"}


@pytest.mark.parametrize("kind", CASES)
def test_a_hostile_file_is_refused_and_never_run(kind, tmp_path, request):
    run = None
    if any(word in kind for word in NEEDS_RUN):
        run = tmp_path / "run"
        shutil.copytree(request.getfixturevalue("sharded_run"), run)
    marker = tmp_path / "MARKER"
    call, named = CASES[kind](tmp_path, marker, run)
    try:
        if kind in RECOVERS:
            call()
            return
        with pytest.raises(ValueError) as info:
            call()
    finally:
        assert not marker.exists(), f"reading {named} ran code from it"
    message = str(info.value)
    assert "\n" not in message and str(named) in message, message
