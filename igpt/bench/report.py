"""Every headline figure from one command, in one process and one time budget.

    igpt bench report --out reports/h100          # one GPU: igpt-s at T = 1024, about 8 minutes with compilation
    igpt bench report --smoke --out /tmp/smoke    # tiny shapes on the CPU, seconds: checks the harness only
    igpt bench report --quality cifar10-ids.tar.xz --out reports/h100   # and the CIFAR-10 probe, 18 minutes

The parts run one after another, each through the benchmark that measures it alone:

- ``train_ar``: ``bench_train`` of our AR step and Hugging Face's ImageGPT on the same ids (tokens/s, MFU
  against the matrix-product rate measured in the same run, peak memory beside the memory plan);
- ``train_bert``: ``bench_train`` of our BERT step (HF has no masked-pixel objective);
- ``sample``: ``bench_sample``, our KV-cached sampler against HF's ``generate`` at the same batch;
- ``loader``: ``bench_loader``, the input pipeline alone at the training batch, set against the images/s
  the AR training step consumes (its appetite);
- ``quality`` (with ``--quality IDS``, a file written by ``igpt bench quality pack``): the CIFAR-10
  quality protocol (``igpt.bench.quality``) with its pretraining shortened to ``igpt.bench.quality.QUALITY_PRETRAIN_SHARE`` of
  the part's cap, the rest left for unpacking, calibration and probing the trained and the random-init model.

Each part is capped at its share of ``--minutes`` (``REPORT_SHARES``) plus what the parts before it left
unused. A part past its cap is interrupted (SIGALRM, so the main thread only) and reported as "timed out";
a part that raises is reported as "failed: <the exception's first line>"; the others still run. The report
names the machine, the versions and the command, and is printed as one table and written as report.json and
report.md in ``--out``.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from igpt.atomic import check_output, write_json, write_text
from igpt.bench.loader import bench_loader
from igpt.bench.memory import GB
from igpt.bench.quality import QualityPart, bench_quality, check_packed
from igpt.bench.sample import bench_sample
from igpt.bench.train import bench_train, free_memory
from igpt.config import (BenchLoaderConfig, BenchReportConfig, BenchSampleConfig, BenchTrainConfig, ModelConfig,
                         QualityConfig)
from igpt.config.bench import REPORT_SHARES
from igpt.runtime import resolve_device

log = logging.getLogger(__name__)

# The figures the rows are held to (docs/benchmarks.md); the CPU smoke run is not held to them.
TARGETS = {"train_ar": ">= 50% MFU, <= 16 GB peak (igpt-s, T = 1024, batch 32, one H100)",
           "train_bert": "within 10% of AR tokens/s",
           "sample": ">= 90 images/s (igpt-s, batch 256, one H100)",
           "loader": ">= 1x the training step's appetite",
           "quality": ">= 75% CIFAR-10 probe accuracy within 10 minutes (one H100)"}
NOT_RUN = "not run (pass --quality IDS)"
SMOKE_MINUTES = 2.0  # what --smoke promises: the whole report, on a quiet machine
# The smoke run's pretraining stops after a few seconds whatever its cap: it checks the plumbing.
SMOKE_PRETRAIN_SECONDS = 3.0


class PartTimedOut(BaseException):
    """Raised inside a part when its cap passes: a BaseException, so that no ``except Exception`` within
    the benchmark mistakes it for its own failure and carries on."""


@contextmanager
def time_cap(seconds: float) -> Iterator[bool]:
    """Raise PartTimedOut in the block after ``seconds``; yields whether the cap is armed (signals reach only
    the main thread, so elsewhere the block runs uncapped)."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return

    def expire(signum: int, frame: Any) -> None:
        raise PartTimedOut

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass(frozen=True)
class Parts:
    """The configuration of each part, as its own benchmark would be given it."""

    train_ar: BenchTrainConfig
    train_bert: BenchTrainConfig
    sample: BenchSampleConfig
    loader: BenchLoaderConfig
    quality: QualityPart | None


def quality_part(cfg: BenchReportConfig, out: Path) -> QualityPart | None:
    """None without --quality; tiny settings with --smoke (the ids' side is whatever was packed)."""
    if cfg.quality is None:
        return None
    if cfg.smoke:
        settings = QualityConfig(preset="igpt-nano", batch_size=16, compile="off", concat=2, max_iter=30,
                                 eval_batch_size=500, device="cpu", seed=cfg.seed)
        return QualityPart(ids=cfg.quality, out=str(out / "quality"), settings=settings,
                           max_pretrain_seconds=SMOKE_PRETRAIN_SECONDS)
    settings = QualityConfig(device=cfg.device, seed=cfg.seed, compile=cfg.compile)
    return QualityPart(ids=cfg.quality, out=str(out / "quality"), settings=settings)


def part_configs(cfg: BenchReportConfig, out: Path) -> Parts:
    """The full shapes, or with ``smoke`` tiny ones on the CPU (a few seconds each on two cores)."""
    quality = quality_part(cfg, out)
    if cfg.smoke:
        shape = {"preset": "igpt-nano", "n_px": 4, "n_vocab": 16, "device": "cpu", "seed": cfg.seed}
        train = BenchTrainConfig(**shape, batch_size=2, steps=3, warmup=2, compile="off", dtype="fp32")
        return Parts(train_ar=BenchTrainConfig(**{**asdict(train), "compare_hf": True}),
                     train_bert=BenchTrainConfig(**{**asdict(train), "objective": "bert"}),
                     sample=BenchSampleConfig(**shape, batch_size=4, batches=1, warmup=1, dtype="fp32",
                                              compare_hf=True),
                     loader=BenchLoaderConfig(data="digits", n_px=8, batch_size=16, batches=3, warmup=1,
                                              vocab_size=16, device="cpu", seed=cfg.seed),
                     quality=quality)
    common = {"preset": cfg.preset, "device": cfg.device, "dtype": cfg.dtype, "seed": cfg.seed}
    train = BenchTrainConfig(**common, batch_size=cfg.train_batch, steps=cfg.steps, warmup=cfg.warmup,
                             compile=cfg.compile)
    return Parts(train_ar=BenchTrainConfig(**{**asdict(train), "compare_hf": True}),
                 train_bert=BenchTrainConfig(**{**asdict(train), "objective": "bert"}),
                 sample=BenchSampleConfig(**common, batch_size=cfg.sample_batch, compare_hf=True),
                 loader=BenchLoaderConfig(data=cfg.data, n_px=ModelConfig.from_preset(cfg.preset).n_px,
                                          batch_size=cfg.train_batch, vocab_size=cfg.loader_vocab_size,
                                          device=cfg.device, seed=cfg.seed),
                 quality=quality)


def _runner(name: str) -> Callable[..., dict[str, Any]]:
    """The benchmark behind a part, looked up when called (so that a test can replace one with monkeypatch)."""
    return {"train_ar": bench_train, "train_bert": bench_train, "sample": bench_sample, "loader": bench_loader,
            "quality": bench_quality}[name]


def run_part(name: str, cfg: Any, cap: float, device: torch.device) -> dict[str, Any]:
    """{"status": "ok" | "failed: ..." | "timed out", "seconds", "cap_seconds", "result"}: never raises
    (but Ctrl-C still stops the report)."""
    out: dict[str, Any] = {"status": "ok", "seconds": 0.0, "cap_seconds": cap, "result": None}
    if cap <= 0:
        out["status"] = "timed out (no time left in the budget)"
        return out
    start = time.perf_counter()
    try:
        with time_cap(cap) as armed:
            out["capped"] = armed
            out["result"] = _runner(name)(cfg, show=False)
    except PartTimedOut:
        out["status"] = "timed out"
    except Exception as e:  # noqa: BLE001 (the report's point: one part's failure is a row, not the end)
        first = (str(e).strip().splitlines() or [""])[0]
        out["status"] = f"failed: {type(e).__name__}: {first}" if first else f"failed: {type(e).__name__}"
    out["seconds"] = time.perf_counter() - start
    if out["status"] != "ok":
        free_memory(device)  # what the part's frames held died with the exception; give it back
        log.warning("bench report: %s %s after %.0f s", name, out["status"], out["seconds"])
    return out


# ---- the rows


def _gb(n_bytes: float | None) -> str:
    return "not measured (no CUDA counter)" if n_bytes is None else f"{n_bytes / GB:.3g} GB"


def _training(r: dict[str, Any], matmul_tflops: float, planned: bool) -> str:
    text = (f"{r['tokens_per_s']:,.0f} tokens/s, {r['mfu']:.1%} MFU of {matmul_tflops:.3g} TFLOP/s, "
            f"peak {_gb(r['peak_memory_bytes'])}")
    return text + (f" (plan {_gb(r['planned_memory_bytes'])})" if planned else "")


def _row(name: str, status: str, figure: str = "-", target: str = "", **values: Any) -> dict[str, Any]:
    return {"row": name, "status": status, "figure": figure if status == "ok" else "-", "target": target,
            "values": values if status == "ok" else {}}


def _train_rows(part: dict[str, Any], what: str) -> list[dict[str, Any]]:
    status, r = part["status"], part["result"]
    if status != "ok":
        names = ["igpt", "Hugging Face", "igpt / Hugging Face"] if what == "AR" else ["igpt"]
        return [_row(f"train {what}, {n}", status, target=TARGETS["train_" + what.lower()] if n == "igpt" else "")
                for n in names]
    s, ours = r["setup"], r["igpt"]
    shape = f"{s['preset']} T={s['T']} batch {s['batch']} {s['dtype']}{' compiled' * bool(s['compile'])}"
    keys = ("tokens_per_s", "images_per_s", "mfu", "peak_memory_bytes", "planned_memory_bytes")
    rows = [_row(f"train {what}, igpt ({shape})", "ok", _training(ours, s["matmul_tflops"], True),
                 TARGETS["train_" + what.lower()], matmul_tflops=s["matmul_tflops"],
                 **{k: ours[k] for k in keys})]
    if what != "AR":
        return rows
    hf = r["hf"]
    if hf is None:
        skipped = f"skipped: {r['hf_skipped']}"
        return rows + [_row("train AR, Hugging Face", skipped), _row("train AR, igpt / Hugging Face", skipped)]
    ratio = ours["tokens_per_s"] / hf["tokens_per_s"]
    memory = (ours["peak_memory_bytes"] / hf["peak_memory_bytes"]
              if ours["peak_memory_bytes"] and hf["peak_memory_bytes"] else None)
    figure = f"{ratio:.2f}x tokens/s" + (f", {memory:.2f}x peak memory" if memory is not None else "")
    return rows + [_row("train AR, Hugging Face", "ok", _training(hf, s["matmul_tflops"], False),
                        matmul_tflops=s["matmul_tflops"], **{k: hf[k] for k in keys[:4]}),
                   _row("train AR, igpt / Hugging Face", "ok", figure, tokens_per_s_ratio=ratio,
                        peak_memory_ratio=memory)]


def _sample_rows(part: dict[str, Any]) -> list[dict[str, Any]]:
    status, r = part["status"], part["result"]
    if status != "ok":
        return [_row(n, status, target=TARGETS["sample"] if n == "sample, igpt" else "")
                for n in ("sample, igpt", "sample, Hugging Face generate", "sample, igpt / Hugging Face")]
    s, ours, hf = r["setup"], r["igpt"], r["hf"]
    rows = [_row(f"sample, igpt ({s['preset']} T={s['n_px'] ** 2} batch {s['batch']} {s['dtype']})", "ok",
                 f"{ours['images_per_s']:.3g} images/s", TARGETS["sample"], images_per_s=ours["images_per_s"])]
    if hf is None:
        skipped = f"skipped: {r['hf_skipped']}"
        return rows + [_row("sample, Hugging Face generate", skipped), _row("sample, igpt / Hugging Face", skipped)]
    ratio = ours["images_per_s"] / hf["images_per_s"]
    return rows + [_row("sample, Hugging Face generate", "ok", f"{hf['images_per_s']:.3g} images/s",
                        images_per_s=hf["images_per_s"]),
                   _row("sample, igpt / Hugging Face", "ok", f"{ratio:.2f}x images/s", images_per_s_ratio=ratio)]


def _loader_row(part: dict[str, Any], train_ar: dict[str, Any]) -> dict[str, Any]:
    if part["status"] != "ok":
        return _row("loader", part["status"], target=TARGETS["loader"])
    s, rate = part["result"]["setup"], part["result"]["loader"]["images_per_s"]
    name = f"loader ({s['stream']} over {s['data']}, {s['n_px']}x{s['n_px']}, batch {s['batch']})"
    figure = f"{rate:,.0f} images/s"
    appetite = train_ar["result"]["igpt"]["images_per_s"] if train_ar["status"] == "ok" else None
    if appetite is None:
        figure += f"; the training step's appetite is unknown (train AR {train_ar['status']})"
    else:
        figure += f", {rate / appetite:.3g}x the AR training step's appetite of {appetite:,.1f} images/s"
    return _row(name, "ok", figure, TARGETS["loader"], images_per_s=rate, appetite_images_per_s=appetite,
                ratio=None if appetite is None else rate / appetite)


def _bert_against_ar(bert: dict[str, Any], ar: dict[str, Any]) -> None:
    """BERT's target is relative to AR: its row says how far behind it is, when both ran."""
    if bert["status"] == "ok" and ar["status"] == "ok":
        ratio = bert["values"]["tokens_per_s"] / ar["values"]["tokens_per_s"]
        bert["figure"] += f"; {ratio:.2f}x AR tokens/s"
        bert["values"]["ar_tokens_per_s_ratio"] = ratio


def _accuracy(h: dict[str, Any]) -> str:
    return (f"{h['lossless']:.1%} on the {h['n_lossless']:,} exact test images, {h['all']:.1%} on all "
            f"{h['n_test']:,} (layer {h['best_layer']})")


def _quality_rows(part: dict[str, Any]) -> list[dict[str, Any]]:
    """The pretrained model's probe accuracy (held to the target) and the same architecture's at random init."""
    if part["status"] != "ok":
        return [_row("CIFAR-10 probe, pretrained", part["status"], target=TARGETS["quality"]),
                _row("CIFAR-10 probe, random init", part["status"])]
    r = part["result"]
    m, minutes = r["model"], sum(r["seconds"].values()) / 60
    shape = f"{m['n_layer']} layers x {m['n_embd']}, T={m['n_px'] ** 2}, {r['steps']} steps"
    figure = _accuracy(r["trained"]) + f"; {minutes:.1f} min in all"
    keys = ("best_layer", "lossless", "all", "n_lossless", "n_test")
    return [_row(f"CIFAR-10 probe, pretrained ({shape})", "ok", figure, TARGETS["quality"],
                 minutes=minutes, steps=r["steps"], **{k: r["trained"][k] for k in keys}),
            _row("CIFAR-10 probe, random init", "ok", _accuracy(r["random_init"]),
                 **{k: r["random_init"][k] for k in keys})]


def rows(parts: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    ar, bert = _train_rows(parts["train_ar"], "AR"), _train_rows(parts["train_bert"], "BERT")
    _bert_against_ar(bert[0], ar[0])
    return [*ar, *bert, *_sample_rows(parts["sample"]), _loader_row(parts["loader"], parts["train_ar"]),
            *_quality_rows(parts["quality"])]


# ---- the machine, the versions and the files


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, Any]:
    gpu = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": gpu.name if gpu else None, "gpu_memory_gb": gpu.total_memory / GB if gpu else None,
            "device": str(device), "platform": platform.platform()}


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": _version("transformers"), "igpt": _version("igpt")}


def _header(report: dict[str, Any]) -> list[str]:
    m, v = report["machine"], report["versions"]
    where = f"GPU: {m['gpu']} ({m['gpu_memory_gb']:.0f} GB)" if m["gpu"] else "no GPU"
    kind = "SMOKE RUN (tiny shapes on the CPU: checks the harness, not the speed)" if report["smoke"] else "report"
    return [f"igpt bench {kind}, {report['date']}",
            f"machine: CPU {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads); {where}",
            f"versions: python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, igpt {v['igpt']}",
            f"command: {report['command']}",
            f"budget: {report['budget_minutes']:g} min; took {report['seconds']:.0f} s"]


def format_table(report: dict[str, Any]) -> str:
    width = max(len(r["row"]) for r in report["rows"])
    lines = [*_header(report), f"{'row':<{width}}  {'status':<10} figure"]
    for r in report["rows"]:
        state = "ok" if r["status"] == "ok" else r["status"]
        lines.append(f"{r['row']:<{width}}  {state:<10} {r['figure'] if r['status'] == 'ok' else ''}".rstrip())
    return "\n".join(lines)


def to_markdown(report: dict[str, Any]) -> str:
    head = _header(report)
    lines = [f"# {head[0]}", "", *(f"- {h}" for h in head[1:]), "",
             "| row | figure | target | status |", "|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['figure']} | {r['target']} | {r['status']} |" for r in report["rows"]]
    lines += ["", "| part | status | seconds | cap seconds |", "|---|---|---|---|"]
    lines += [f"| {name} | {p['status']} | {p['seconds']:.1f} | {p['cap_seconds']:.0f} |"
              for name, p in report["parts"].items()]
    return "\n".join(lines) + "\n"


def bench_report(cfg: BenchReportConfig, *, command: str, overwrite: bool = False,
                 show: bool = True) -> dict[str, Any]:
    """Run every part within ``cfg.minutes``; print the table, write OUT/report.json and OUT/report.md and
    return the report ({"rows": [...], "parts": {...}, "machine", "versions", "command", ...})."""
    if cfg.out is None:
        raise ValueError("--out is required: the directory report.json and report.md are written to")
    out = check_output(cfg.out, "--out", overwrite=overwrite)  # before minutes of measuring
    if cfg.quality is not None:
        check_packed(cfg.quality, "--quality")
    configs = part_configs(cfg, out)
    device = resolve_device(configs.train_ar.device)
    # the smoke run promises under SMOKE_MINUTES, so its caps say so too (a loaded machine then shows timed-out
    # rows); without --quality the speed parts' shares of them come to 54 s
    budget, started = min(cfg.minutes, SMOKE_MINUTES if cfg.smoke else cfg.minutes) * 60, time.perf_counter()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts: dict[str, dict[str, Any]] = {}
    share = 0.0
    for name, fraction in REPORT_SHARES.items():
        share += fraction  # what earlier parts left unused is this one's too
        part_cfg, cap = getattr(configs, name), share * budget - (time.perf_counter() - started)
        if name == "quality":
            if part_cfg is None:
                parts[name] = {"status": NOT_RUN, "seconds": 0.0, "cap_seconds": cap, "result": None, "config": None}
                continue
            part_cfg = part_cfg.with_cap(cap)
            Path(part_cfg.out).mkdir(parents=True, exist_ok=True)
        parts[name] = run_part(name, part_cfg, cap, device)
        parts[name]["config"] = asdict(part_cfg)
    report = {"date": date, "command": command, "machine": machine(device), "versions": versions(),
              "smoke": cfg.smoke, "budget_minutes": budget / 60, "seconds": time.perf_counter() - started,
              "config": asdict(cfg), "rows": rows(parts), "parts": parts}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    write_text(out / "report.md", to_markdown(report))
    if show:
        print(format_table(report))
        print(f"-> {out / 'report.json'}, {out / 'report.md'}")
    return report
