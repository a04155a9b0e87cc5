"""`moshivis-mlx --serve`: open the model once, then serve it until Ctrl-C."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from ..app.opening import open_session, opening_steps, resolve_bundle
from ..app.options import AppOptions
from ..errors import UsageError
from ..paths import check_writable
from ..progress import Steps
from ..session import load_picture
from ..signals import Stopped
from .host import ModelHost, ServedModel
from .security import is_loopback, local_addresses, security_for
from .server import STATIC, Limits, Server, serve


def _cache() -> Path:
    from moshivis_mlx.weights_convert.hub import cache_root

    return cache_root() / "serve"


def check_static(static: Path | None) -> Path:
    path = Path(static) if static is not None else STATIC
    if not (path / "index.html").is_file():
        raise UsageError(f"--static {path}: no index.html in it",
                         "give the folder of a built web client (its index.html at the top)")
    return path


def run_serve(opts: AppOptions, console: Console) -> int:
    s = opts.serve
    # Refusals first: nothing loads for a command line that cannot be served.
    security = security_for(s.host, s.ssl_cert, s.ssl_key, s.no_tls, s.token, _cache())
    static = check_static(s.static)
    record = opts.record_dir if opts.record else None
    if record is not None:
        check_writable(record, "record the conversations in", directory=True,
                       fix="pick another directory with --record DIR")
    if opts.demo:  # the tiny random model (made on first use): the page without weights
        from ..app.demo import demo_bundle

        bundle, _ = demo_bundle()
        opts = replace(opts, model=opts.model.on_weights(bundle))
    picture = load_picture(opts.image) if opts.image else None
    want_vision = not opts.no_image
    with Steps(console, 1 + opening_steps(want_vision, picture is not None)) as steps:
        bundle = resolve_bundle(opts.model, steps)

        def prepare() -> ServedModel:
            opened = open_session(opts.model, steps, want_vision, bundle=bundle)
            session = opened.session
            tokens = None
            if picture is not None:
                with steps.step(f"image {Path(opts.image).name}"):
                    tokens = session.vision.encode_image(picture)
            with steps.step("warm-up"):
                session.warm_up()
            return ServedModel(session, Path(opened.bundle).name, tokens,
                          Path(opts.image).name if opts.image else None)

        host = ModelHost(prepare, record)
        host.start()
        host.wait_ready()
    logging.basicConfig(level=logging.WARNING)
    server = Server(host, security, static, Limits(idle_timeout=s.idle_timeout))

    def started(port: int) -> None:
        scheme = "https" if security.ssl_context is not None else "http"
        shown = s.host if is_loopback(s.host) or not _unspecified(s.host) else None
        hosts = [shown] if shown else local_addresses() or ["<this machine's address>"]
        query = f"?token={security.token}" if security.token else ""
        for h in hosts:
            h = f"[{h}]" if ":" in h else h
            console.print(f"serving on {scheme}://{h}:{port}/{query}", highlight=False)
        ws = "wss" if security.ssl_context is not None else "ws"
        console.print(f"Kyutai's clients: {ws}://{hosts[0]}:{port}/api/chat{query}",
                      highlight=False)
        if security.fingerprint:
            console.print(f"self-signed certificate {security.cert}; SHA-256 fingerprint "
                          f"{security.fingerprint}" if s.ssl_cert is None else
                          f"certificate SHA-256 fingerprint {security.fingerprint}",
                          highlight=False)
        if record is not None:
            console.print(f"each conversation is recorded in a new folder under {record}/",
                          highlight=False)
        console.print("one conversation at a time; Ctrl-C stops the server", highlight=False)

    try:
        asyncio.run(serve(server, s.host, s.port, started))
    except KeyboardInterrupt as e:  # Ctrl-C is how a server is stopped; SIGTERM says so
        console.print(f"stopped: {server.served} conversation(s) served, {server.refused} "
                      f"refused as busy", highlight=False)
        if isinstance(e, Stopped):
            raise
    return 0


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False
