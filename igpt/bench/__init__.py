"""Benchmarks: sampling and training throughput (ours against Hugging Face's), the input pipeline alone,
FLOPs and the per-GPU memory plan, and every headline figure in one report."""

from igpt.bench.loader import bench_loader
from igpt.bench.memory import plan
from igpt.bench.report import bench_report
from igpt.bench.sample import bench_sample
from igpt.bench.train import bench_train

__all__ = ["bench_loader", "bench_report", "bench_sample", "bench_train", "plan"]
