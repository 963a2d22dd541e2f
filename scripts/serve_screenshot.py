"""A screenshot of the ``igpt serve`` page after a completion, as in the README (docs/images/serve.png).

Starts ``igpt serve`` on a free local port, opens it in Debian's headless Chromium through Playwright (no
browser is downloaded), chooses a picture (image ``--index`` of ``--data``, or the ``--image`` file), keeps
``--rows`` rows, presses Complete, waits for the completions and saves the page as a PNG:

    make demo
    python scripts/serve_screenshot.py --checkpoint igpt-demo/run --data digits --index 5 --out docs/images/serve.png
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time

from igpt.atomic import check_output, write_bytes

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
UPLOAD_INPUT = "input[type=file][data-testid='Upload an image-upload-button']"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(proc: subprocess.Popen, port: int, seconds: float = 180.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"igpt serve exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("igpt serve did not start listening")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="weights, as igpt serve reads them")
    ap.add_argument("--data", help="dataset to pick the picture from (with --index)")
    ap.add_argument("--index", type=int, default=0, help="image number in --data (default: 0)")
    ap.add_argument("--image", help="an image file to upload instead of --data")
    ap.add_argument("--rows", type=int, default=4, help="rows to keep (default: 4)")
    ap.add_argument("--n-samples", type=int, default=6, help="completions (default: 6)")
    ap.add_argument("--chromium", default="/usr/bin/chromium", help="the browser (default: /usr/bin/chromium)")
    ap.add_argument("--out", required=True, help="the PNG to write")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = ap.parse_args()
    if bool(args.data) == bool(args.image):
        raise SystemExit("give exactly one of --data and --image")
    check_output(args.out, "--out", overwrite=args.overwrite)

    from playwright.sync_api import sync_playwright

    port = free_port()
    cmd = [sys.executable, "-m", "igpt", "serve", "--checkpoint", args.checkpoint, "--port", str(port),
           "--n-samples", str(args.n_samples)] + (["--data", args.data] if args.data else [])
    proc = subprocess.Popen(cmd)
    try:
        wait_for(proc, port)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"http://127.0.0.1:{port}", wait_until="domcontentloaded")
            if args.data:
                page.get_by_role("tab", name="From the dataset").click()
                page.fill("#pick input[type=number]", str(args.index))
                page.press("#pick input[type=number]", "Enter")
                page.click("#use-pick")
            else:
                page.set_input_files(UPLOAD_INPUT, args.image)
            page.wait_for_function("document.querySelector('#status').innerText.includes('picture chosen')",
                                   timeout=60_000)
            page.fill("#rows input[type=number]", str(args.rows))
            page.press("#rows input[type=number]", "Enter")
            page.click("#complete")
            page.wait_for_function("document.querySelector('#status').innerText.includes('Done')", timeout=300_000)
            write_bytes(args.out, page.screenshot(full_page=True))
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"page after a completion -> {args.out}")


if __name__ == "__main__":
    main()
