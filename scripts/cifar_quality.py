"""The CIFAR-10 quality protocol from a checkout: the same as ``igpt bench quality pack|run`` (see
``igpt bench quality --help`` and docs/evaluation.md), kept so that older command lines keep working.

    python scripts/cifar_quality.py pack --data cifar-10-batches-py --out cifar10-ids.tar.xz
    python scripts/cifar_quality.py run --ids cifar10-ids.tar.xz --out runs/quality
"""

from __future__ import annotations

import sys

from igpt.cli import main as igpt_main


def main(argv: list[str] | None = None) -> int:
    return igpt_main(["bench", "quality", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
