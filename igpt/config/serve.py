"""``igpt serve``: where the page listens, what it accepts, and its controls' defaults."""

from __future__ import annotations

from dataclasses import dataclass

from igpt.config.fields import arg, check_fields, require_at_least, require_positive

PORT_RANGE = (1, 65535)


@dataclass(frozen=True)
class ServeConfig:
    """The page's server and limits. How ids are drawn (temperature, top-k, seed, device, dtype) is
    ``SampleConfig``'s, whose values are the page's defaults."""

    host: str = arg("127.0.0.1", "address to listen on; 127.0.0.1 keeps the page on this machine, 0.0.0.0 "
                    "opens it to the network")
    port: int = arg(7860, "port to listen on")
    max_upload_mb: float = arg(8.0, "largest upload accepted, in MB; larger files are refused on the page")
    concurrency: int = arg(1, "requests computed at once; the others wait in the queue, so that several users "
                           "cannot exhaust memory together")
    queue_size: int = arg(16, "requests that may wait in the queue; more are refused with a message")
    n_samples: int = arg(4, "completions per image, the page's initial value")
    max_samples: int = arg(16, "the most completions or samples one request may ask for")
    rounds: int = arg(8, "BERT: rounds of iterative infilling")
    cache_s: int = arg(600, "seconds each file the page writes (every picture it shows, every upload) stays in "
                       "the server's temporary folder, for the browser to fetch and download; older ones are "
                       "deleted, and the folder goes when the server stops")

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.host.strip():  # Gradio would take "" for 127.0.0.1; say what is meant instead
            raise ValueError("--host must name an address, e.g. 127.0.0.1 (this machine only)")
        low, high = PORT_RANGE
        if not low <= self.port <= high:
            raise ValueError(f"--port must be in {low}..{high}, got {self.port}")
        require_positive(self, ("max_upload_mb",))
        require_at_least(self, ("concurrency", "queue_size", "n_samples", "max_samples", "rounds", "cache_s"), 1)
        if self.n_samples > self.max_samples:
            raise ValueError(f"--n-samples {self.n_samples} is more than --max-samples {self.max_samples}")

    @property
    def sweep_s(self) -> int:
        """How often the server looks for files older than ``cache_s``: a tenth of it, so that none outlives
        it by much more."""
        return max(1, self.cache_s // 10)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)
