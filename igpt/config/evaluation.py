"""How a checkpoint is sampled, scored, read out and probed."""

from __future__ import annotations

import math
from dataclasses import dataclass

from igpt.config.fields import (DTYPES, SWITCH, any_palette_arg, arg, check_fields, device_arg, dtype_arg,
                                require_at_least, require_fraction, resize_arg, seed_arg)

# How BERT infilling shrinks the masked count over its rounds (``igpt complete --schedule``,
# ``igpt.generate.infill``); here, so that the flag's choices need no import of the sampler.
SCHEDULES = ("cosine", "linear")


@dataclass(frozen=True)
class SampleConfig:
    """How ids are drawn, shared by ``igpt sample`` and ``igpt complete``."""

    temperature: float = arg(1.0, "softmax temperature; 0 is the greedy argmax (the paper sampled at 1)")
    top_k: int = arg(0, "draw only from the k most likely ids at each step; 0 = no top-k filter")
    top_p: float = arg(1.0, "nucleus: draw only from the smallest set of ids whose probability reaches p; "
                       "1 = no nucleus filter")
    seed: int = seed_arg("seed of the draws (results also depend on the device and --batch-size)")
    batch_size: int = arg(64, "images sampled at once")
    device: str = device_arg()
    dtype: str = arg("auto", "weights and KV cache: 'auto' (bf16 on GPUs that have it, fp32 elsewhere), "
                     "'bf16' or 'fp32'", choices=DTYPES)
    window: int = arg(64, "the one-token step attends the cache in multiples of this many slots (static "
                      "shapes; one CUDA graph per multiple); 1 = exactly the filled slots")
    cuda_graph: bool = arg(True, "on CUDA, replay the one-token step as CUDA graphs (no effect on the CPU)")
    compile: str = arg("off", "torch.compile the one-token step, fusing its small kernels: 'on', 'off', or "
                       "'auto' (on where pretraining's auto would compile); compiling takes a minute or more, "
                       "so it pays off only for long jobs", choices=SWITCH)

    def __post_init__(self) -> None:
        if isinstance(self.compile, bool):
            object.__setattr__(self, "compile", "on" if self.compile else "off")
        check_fields(self)
        require_at_least(self, ("temperature", "top_k"), 0)
        require_fraction(self, "top_p", low_open=True, high_open=False)
        require_at_least(self, ("batch_size", "window"), 1)

    def filters(self) -> dict[str, float | int | None]:
        """Keyword arguments of ``sample``/``infill``: the CLI's 0 and 1 mean 'off', the API's None."""
        return {"temperature": self.temperature, "top_k": self.top_k or None,
                "top_p": None if self.top_p >= 1.0 else self.top_p}


@dataclass(frozen=True)
class ClassifyConfig:
    """How ``igpt classify`` reads images with a fine-tuned checkpoint."""

    top_k: int = arg(5, "classes printed per image, most probable first")
    n_masks: int = arg(1, "BERT checkpoints: independent input masks, at the rate the checkpoint records, whose "
                          "class probabilities are averaged (the paper's mask ensemble)")
    seed: int = arg(0, "BERT checkpoints: seed of the input masks (the same seed, the same answer)")
    device: str = device_arg()

    def __post_init__(self) -> None:
        check_fields(self)
        require_at_least(self, ("top_k", "n_masks"), 1)


@dataclass(frozen=True)
class EvalDataConfig:
    """The split of ``--data`` that ``score`` and ``complete`` read."""

    data: str | None = arg(None, "dataset (any format 'igpt prepare' reads, or a prepared cache); an ids cache "
                           "must come from the checkpoint's tokenizer", type=str)
    split: str | None = arg(None, "split to use (default: test when present, else val)", type=str,
                            choices=("train", "val", "test", "unlabeled", "train_all"))
    val_fraction: float = arg(0.1, "val carved from train when the source has none; match the run's")
    split_seed: int = seed_arg("seed of that carve; match the run's --seed")
    resize: str = resize_arg()
    any_palette: bool = any_palette_arg()

    def __post_init__(self) -> None:
        check_fields(self)
        require_fraction(self, "val_fraction")


@dataclass(frozen=True)
class ScoreConfig:
    """``igpt score``: the mean NLL of a split."""

    batch_size: int = arg(64, "images per forward pass")
    mask_prob: float = arg(-1.0, "BERT: fraction of positions masked; -1 = the rate the checkpoint was "
                           "trained with (0.15 when it records none)")
    seed: int = seed_arg("BERT: seed of the masks")
    device: str = device_arg()
    dtype: str = dtype_arg()

    def __post_init__(self) -> None:
        check_fields(self)
        require_at_least(self, ("batch_size",), 1)
        if self.mask_prob != -1:
            require_fraction(self, "mask_prob", low_open=True)


MASK_COMBINE = ("mean", "vote")


@dataclass(frozen=True)
class FeatureConfig:
    """How features are read out of a model (``igpt probe``)."""

    batch_size: int = arg(256, "images per forward pass when extracting features")
    device: str = device_arg()
    dtype: str = dtype_arg()
    bert_mask: bool = arg(True, "BERT checkpoints: mask the inputs as in training when extracting features "
                          "(the paper does); --no-bert-mask reads them unmasked")
    mask_prob: float = arg(-1.0, "BERT: probability that a position is masked; -1 = the rate the checkpoint "
                           "was trained with (0.15 when it records none)")
    n_masks: int = arg(1, "BERT: read each image under this many independent masks (the paper used 5), "
                       "combined as --mask-combine says")
    mask_combine: str = arg("mean", "BERT with --n-masks K > 1: 'vote' (the paper: the probe is fitted on one "
                            "mask's features and its K test predictions are combined by a modal vote, ties "
                            "broken at random, seeded) or 'mean' (one probe on features averaged over the K "
                            "masks)", choices=MASK_COMBINE)
    flip_average: bool = arg(False, "average each image's features with those of its mirror image "
                             "(test-time augmentation; not in the paper)")
    mask_seed: int = seed_arg("seed of the BERT masks")
    cache: bool = arg(True, "reuse features cached in --out by an earlier run with identical inputs, and "
                      "continue an extraction that was stopped part-way")
    layers: str = arg("all", "layers to extract and probe: 'all' (0..n_layer; 0 is the embedding, n_layer "
                      "the final norm), a list '0,3,5', a range '2-10', or a mix '0,4-6'")
    feats_dtype: str = arg("fp16", "how features are stored on disk (memory-mapped, one .npy file per layer): "
                           "'fp16' (half the disk) or 'fp32'", choices=("fp16", "fp32"))

    def __post_init__(self) -> None:
        check_fields(self)
        require_at_least(self, ("batch_size", "n_masks"), 1)
        if self.mask_prob != -1:
            require_fraction(self, "mask_prob", low_open=True)


SOLVERS = ("auto", "lbfgs", "sgd")
# auto: full-batch L-BFGS while the fitting matrix (N images x D features) holds at most this many values
# (400 MB in float32), minibatch SGD streamed from disk above it
AUTO_SGD_VALUES = 100_000_000
DEFAULT_L2_GRID = "1e-6,3e-6,1e-5,3e-5,1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1,3e-1,1"


@dataclass(frozen=True)
class ProbeConfig:
    """The linear probe of ``igpt probe``."""

    l2_grid: str = arg(DEFAULT_L2_GRID, "comma-separated L2 strengths searched on the validation carve")
    l2: float = arg(-1.0, "a fixed L2 strength (no search); -1 searches --l2-grid")
    val_fraction: float = arg(0.1, "fraction of each class of train carved out (seeded) to choose the L2 "
                              "strength and the best layer")
    max_iter: int = arg(500, "L-BFGS iterations per fit")
    seed: int = seed_arg("seed of the validation carve and of the low-data subsets")
    concat: int = arg(0, "also probe the concatenation of this many consecutive layers centred on the best "
                      "one (0 or 1: off; the paper used 5 for ImageNet); at the ends the window shifts inwards "
                      "rather than shrinking, and holds every probed layer when K exceeds them")
    labels_per_class: int = arg(0, "low-data protocol: fit on this many labelled images per class (0: all of "
                                "train)")
    repeats: int = arg(5, "low-data protocol: how many random subsets; mean +- std is reported")
    solver: str = arg("auto", "'lbfgs' (full batch, the paper's CIFAR and STL-10 probe), 'sgd' (minibatch SGD "
                      "streamed from the memory-mapped features, the paper's ImageNet probe) or 'auto': L-BFGS "
                      f"while N images x D features <= {AUTO_SGD_VALUES:.0e} values, SGD above", choices=SOLVERS)
    sgd_lr_grid: str = arg("3,1,0.3,0.1", "SGD: comma-separated learning rates tried at each L2 strength (in "
                           "preconditioned coordinates, where rates above about 3.8 diverge); each is fitted on "
                           "the carve's fitting part, and the one with the lowest validation cross-entropy is kept")
    sgd_epochs: int = arg(40, "SGD: passes over the fitting images per fit (cosine schedule to 0)")
    sgd_batch_size: int = arg(256, "SGD: images per step")
    baseline: bool = arg(False, "also probe the same architecture at random initialisation (seeded by --seed) "
                         "and report it beside the trained model")
    eval_subset: str = arg("all", "test images scored: 'all', or 'lossless' (the bit-exact images marked by "
                           "test_lossless in cifar10.npz; 'all' is reported too)", choices=("all", "lossless"))

    def __post_init__(self) -> None:
        check_fields(self)
        self.grid  # noqa: B018 -- parses and validates the grid
        if self.l2 < 0 and self.l2 != -1:
            raise ValueError(f"--l2 must be >= 0, or -1 to search --l2-grid; got {self.l2}")
        require_fraction(self, "val_fraction")
        require_at_least(self, ("max_iter", "repeats", "sgd_epochs", "sgd_batch_size"), 1)
        self.lr_grid  # noqa: B018 -- parses and validates the grid
        require_at_least(self, ("concat", "labels_per_class"), 0)

    @property
    def lr_grid(self) -> tuple[float, ...]:
        return _numbers(self.sgd_lr_grid, "--sgd-lr-grid", positive=True)

    @property
    def grid(self) -> tuple[float, ...]:
        if self.l2 >= 0:
            return (self.l2,)
        return _numbers(self.l2_grid, "--l2-grid", positive=False)


def _numbers(text: str, name: str, *, positive: bool) -> tuple[float, ...]:
    """The comma-separated finite numbers of ``text`` (> 0 if ``positive``, else >= 0)."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) and (v > 0 if positive else v >= 0) for v in values):
        raise ValueError(f"{name} must hold finite values {'> 0' if positive else '>= 0'}, got {text!r}")
    return values


@dataclass(frozen=True)
class AttentiveConfig:
    """The attentive probe of ``igpt probe --attentive``: a frozen trunk cut at a layer, one learned query
    attending over that layer's token states, a linear classifier, trained with AdamW."""

    attentive: bool = arg(False, "also train an attentive probe (a learned query attending over the token "
                          "states of a layer, then a linear classifier) on --attentive-layers")
    attentive_layers: str = arg("best", "layers the attentive probe reads: 'best' (the linear probe's layer "
                                "chosen on validation), 'all', or a comma-separated list such as 2,3")
    attentive_epochs: int = arg(10, "epochs over the fit part of train; the epoch scored is chosen on the "
                                "validation carve")
    attentive_lr: str = arg("3e-3,1e-3", "comma-separated AdamW learning rates, all trained at once on the same "
                            "batches; the one scored is chosen on the validation carve")
    attentive_weight_decay: float = arg(0.05, "AdamW weight decay of the head")
    attentive_heads: int = arg(4, "attention heads of the query (must divide the model width)")
    attentive_batch_size: int = arg(64, "images per step of the attentive probe")

    def __post_init__(self) -> None:
        check_fields(self)
        self.lrs  # noqa: B018 -- parses and validates the grid
        require_at_least(self, ("attentive_epochs", "attentive_heads", "attentive_batch_size"), 1)
        require_at_least(self, ("attentive_weight_decay",), 0)
        spec = self.attentive_layers.strip()
        if spec not in ("best", "all"):
            try:
                layers = [int(v) for v in spec.split(",") if v.strip()]
            except ValueError:
                layers = []
            if not layers or min(layers) < 0:
                raise ValueError(f"--attentive-layers must be 'best', 'all' or comma-separated layers >= 0, "
                                 f"got {self.attentive_layers!r}")

    @property
    def lrs(self) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in self.attentive_lr.split(",") if v.strip())
        except ValueError:
            values = ()
        if not values or not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"--attentive-lr must be comma-separated learning rates > 0, got {self.attentive_lr!r}")
        return tuple(sorted(set(values), reverse=True))

    def layers(self, n_layer: int, best: int | None) -> list[int]:
        """The layers to probe in a model of ``n_layer`` blocks (0..n_layer); ``best`` is the linear probe's."""
        spec = self.attentive_layers.strip()
        if spec == "all":
            return list(range(n_layer + 1))
        if spec == "best":
            if best is None:
                raise ValueError("--attentive-layers best needs the linear probe's best layer; name the layers")
            return [best]
        layers = sorted({int(v) for v in spec.split(",") if v.strip()})
        if layers[-1] > n_layer:
            raise ValueError(f"--attentive-layers {layers[-1]} is outside this model's layers 0..{n_layer}")
        return layers
