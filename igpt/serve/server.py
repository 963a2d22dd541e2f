"""Where the page of ``igpt serve`` runs: the address it listens on, checked before the model is loaded, and
the folder its files go to, its own, bounded while the server runs and removed when it stops.

Gradio writes every picture a page shows as a PNG (a completion growing row by row is new pictures at every
row) and every upload as a file, each in a folder of its own named by its hash, under ``GRADIO_TEMP_DIR``
(by default ``/tmp/gradio``, shared by every Gradio app of the machine), and deletes none of them unless told
to. Here each server gets a folder of its own from ``tempfile.mkdtemp``; a sweep deletes the files older than
``--cache-s`` and the folders left empty, and the whole folder goes when the server stops: on Ctrl-C, on
SIGTERM, or when its start fails. Gradio's own deletion (``gr.Blocks(delete_cache=...)``) is not used: in
Gradio 6 its scheduled task iterates a set of paths that request threads add to, and the first
"Set changed size during iteration" ends the task for good, after which nothing is deleted; it also leaves
every hash folder behind.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igpt.config import ServeConfig
from igpt.serve.engine import Engine
from igpt.serve.page import CSS, _theme, build_page

FOLDER_PREFIX = "igpt-serve-"
GRADIO_FOLDER = "GRADIO_TEMP_DIR"


def check_address(host: str, port: int) -> None:
    """Refuse (ValueError, one line naming the flag) an address this machine cannot listen on: a host that
    does not resolve or is not one of its own addresses, a port in use or not allowed. Each address the host
    resolves to is bound as the server binds it (asyncio's ``create_server``) and closed at once, so nothing
    listens; the server can still lose the port to another process before it starts, which ``serving``
    reports in the same words."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # Gradio accepts "[::1]"
    try:
        found = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        why = e.strerror if isinstance(e, socket.gaierror) else str(e)
        raise ValueError(f"--host {host}: no address of that name ({why}); give an address of this machine, "
                         "e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every network)") from None
    bound, unavailable = False, None
    for family, kind, proto, _, address in found:
        try:
            s = socket.socket(family, kind, proto)
        except OSError:
            continue  # a family this machine lacks: asyncio skips it too
        with s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server: TIME_WAIT leaves it free
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(address)
                bound = True
            except OSError as e:
                if e.errno != errno.EADDRNOTAVAIL:
                    raise ValueError(_bind_error(host, port, e)) from None
                unavailable = e  # asyncio skips such an address, and fails only when none is left
    if not bound:
        raise ValueError(_bind_error(host, port, unavailable or OSError(errno.EADDRNOTAVAIL, "no address")))


def _bind_error(host: str, port: int, e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        return f"--port {port}: already in use on {host} (another server listens there); choose another --port"
    if e.errno == errno.EADDRNOTAVAIL:
        return (f"--host {host}: not an address of this machine ({e.strerror}); give one of its own, e.g. "
                "127.0.0.1 (this machine only) or 0.0.0.0 (every network)")
    if e.errno == errno.EACCES:
        return f"--port {port}: not allowed to listen on it ({e.strerror}); ports below 1024 need privileges"
    return f"--host {host} --port {port}: cannot listen there ({e.strerror or e})"


@dataclass(frozen=True)
class Served:
    """A running page: its address and the folder that holds its files."""

    url: str
    folder: Path
    page: Any  # the launched gradio.Blocks


def sweep(folder: Path, before: float, keep: Collection[str] = ()) -> list[str]:
    """Delete the files under ``folder`` last written before ``before`` (seconds since the epoch), but those in
    ``keep``, and the folders that are empty and unchanged since before it too; the paths of the files
    deleted. A folder goes a sweep after it was emptied (its mtime is the deletion's), and one Gradio has
    just made for a new file is too young to go before the file is written. What can still lose a race is a
    picture shown again in the microseconds its expired copy or emptied folder is deleted: Gradio reuses both
    (same hash), so that picture breaks, or its request fails with Gradio's error box."""
    removed = []
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
                if path not in keep and max(st.st_mtime, st.st_ctime) < before:  # Gradio touches a reused copy
                    os.unlink(path)
                    removed.append(path)
            except FileNotFoundError:
                pass
        for name in dirs:
            path = os.path.join(root, name)
            try:
                if os.lstat(path).st_mtime < before:
                    os.rmdir(path)  # only an empty folder goes
            except OSError:
                pass
    return removed


@contextmanager
def serving(engine: Engine) -> Iterator[Served]:
    """Start the page in this process (not blocking) with a temporary folder of its own for Gradio's files;
    on leaving, stop it and remove the folder. A failure to listen is a ValueError naming the flag."""
    cfg = engine.cfg
    previous = os.environ.get(GRADIO_FOLDER)
    done, folder, page = threading.Event(), None, None
    try:
        folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX)).resolve()  # Gradio records resolved paths
        # Gradio takes its folder from this variable only, read when each component is built, when the app
        # starts and when a file is served: it must hold from build_page until the server has stopped.
        os.environ[GRADIO_FOLDER] = str(folder)
        page = build_page(engine)
        # what the page wrote before anyone asked for anything (the model card's swatch) is part of every page
        # load: it stays
        keep = frozenset(str(p) for p in folder.rglob("*") if p.is_file())
        page.queue(default_concurrency_limit=cfg.concurrency, max_size=cfg.queue_size)
        try:
            page.launch(**_launch_options(engine))
        except OSError as e:  # another process took the port since check_address, or the host went away
            check_address(cfg.host, cfg.port)  # names the flag when it can
            why = str(e).split(". ")[0]  # Gradio's advice after it (GRADIO_SERVER_PORT, launch()) is not igpt's
            raise ValueError(f"--host {cfg.host} --port {cfg.port}: the server could not listen there ({why})"
                             ) from None
        threading.Thread(target=_sweep_until, args=(page, folder, keep, cfg, done), name="igpt-serve-sweep",
                         daemon=True).start()
        yield Served(page.local_url, folder, page)
    finally:
        done.set()
        try:
            if page is not None:
                page.close(verbose=False)  # up to seconds: a second Ctrl-C may cut it short, not the removal
        finally:
            if previous is None:
                os.environ.pop(GRADIO_FOLDER, None)
            else:
                os.environ[GRADIO_FOLDER] = previous
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)


def _sweep_until(page: Any, folder: Path, keep: frozenset[str], cfg: ServeConfig, done: threading.Event) -> None:
    while not done.wait(cfg.sweep_s):
        removed = sweep(folder, time.time() - cfg.cache_s, keep)
        # Gradio remembers every file it wrote, to delete them itself: forget the deleted ones, or its sets
        # grow by a path per picture for the server's life. difference_update runs in C under the GIL, so a
        # request thread adding a path meanwhile is safe (Gradio's own Python loop over the sets is not).
        for paths in list(getattr(page, "temp_file_sets", ())):
            paths.difference_update(removed)


def _launch_options(engine: Engine) -> dict[str, Any]:
    import gradio as gr  # the optional extra, as in build_page

    cfg = engine.cfg
    # num_workers=0: no static file servers on ports of their own (GRADIO_NUM_WORKERS would start some); the
    # page listens on --host and --port and nowhere else.
    return dict(server_name=cfg.host, server_port=cfg.port, share=False, inbrowser=False, prevent_thread_lock=True,
                max_file_size=cfg.max_upload_bytes, theme=_theme(gr), css=CSS, show_error=False, footer_links=[],
                mcp_server=False, pwa=False, ssr_mode=False, enable_monitoring=False, num_workers=0)


def launch(engine: Engine) -> None:
    """Serve the page until Ctrl-C or SIGTERM, then stop it and remove its files. One queue computes
    ``--concurrency`` requests at a time."""
    # SIGTERM (a service manager's stop) ends the server as Ctrl-C does: the folder is removed on the way out
    stop_on_term = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if stop_on_term else None
    try:
        with serving(engine) as served:
            while served.page.is_running:
                time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        if stop_on_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
