"""Console entry points of the apps: `flowers-demo` (app.py calls it too), `flowers-serve` (Ray Serve) and
`flowers-predict` (batch prediction, in this process or on Ray Data): parse, then call the app.

Each quiets third-party deprecation noise before importing its app (gradio warns on import); Ray is imported only
by flowers-serve and `flowers-predict --engine ray`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flowers_classifier.backends import BACKENDS
from flowers_classifier.cli import quiet_third_party_warnings
from flowers_classifier.errors import FlowersError
from flowers_classifier.inference import available_cpus


def demo_parser() -> argparse.ArgumentParser:
    from . import demo as app

    p = argparse.ArgumentParser(prog="app.py", description=app.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("models")
    m.add_argument("--cnn", type=Path, default=app.DEFAULT_CNN,
                   help=f"exported CNN (default: {app.DEFAULT_CNN}; skipped when missing)")
    m.add_argument("--vit", type=Path, default=app.DEFAULT_VIT,
                   help=f"exported CLIP ViT (default: {app.DEFAULT_VIT}; skipped when missing)")
    m.add_argument("--examples", type=Path, help="folder of example photos (or of <class>/ subfolders)")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=7860, help="TCP port (default 7860)")
    s.add_argument("--share", action="store_true",
                   help="also open a public gradio.live link (needs internet; off unless given)")
    s.add_argument("--auth", metavar="USER:PASS", default=os.environ.get(app.AUTH_ENV),
                   help=f"require this login for the page and its API (default: ${app.AUTH_ENV} if set)")
    s.add_argument("--mcp", action="store_true",
                   help="also serve the classifier as an MCP tool for LLM agents at <url>gradio_api/mcp/")
    return p


def demo(argv: list[str] | None = None) -> int:
    """`python app.py` / `flowers-demo`: build the page on the models given, then serve it until Ctrl-C."""
    quiet_third_party_warnings()
    from . import demo as app

    args = demo_parser().parse_args(argv)
    try:
        auth = app.parse_auth(args.auth, f"--auth (or ${app.AUTH_ENV})")
        if auth and args.mcp:
            raise app.AuthError(app.MCP_WITH_AUTH_ERROR)
        page = app.build_demo(args.cnn, args.vit, args.examples)
    except FlowersError as e:  # ModelFileError, ExamplesError, AuthError
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        app.launch_demo(page, args.host, args.port, args.share, mcp=args.mcp, auth=auth)
    except OSError as e:
        print(f"error: cannot serve on {args.host}:{args.port} ({e}). Pass a free --port or another --host.",
              file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------- flowers-serve

def serve_parser() -> argparse.ArgumentParser:
    from . import serve as app

    p = argparse.ArgumentParser(prog="flowers-serve", description=app.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="the exported model (.pth or .onnx; a bare name is looked up in models/)")
    p.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                   help="what runs the model in each replica (default auto: see load_model)")
    b = p.add_argument_group("replicas and batching (docs/serving.md: what each knob costs)")
    b.add_argument("--replicas", type=int, default=1, help="copies of the model, each in its own process (default 1)")
    b.add_argument("--threads", type=int, help="CPUs (torch threads) per replica (default: this machine's CPUs "
                                               "divided by --replicas; set it when joining a cluster)")
    b.add_argument("--max-batch", type=int, default=app.DEFAULT_MAX_BATCH,
                   help=f"most requests one forward pass answers (default {app.DEFAULT_MAX_BATCH})")
    b.add_argument("--batch-wait-ms", type=float, default=app.DEFAULT_BATCH_WAIT_MS,
                   help=f"how long a batch waits to fill before it runs (default {app.DEFAULT_BATCH_WAIT_MS:g}: "
                        f"batches form from the requests queued while the previous one ran)")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=app.DEFAULT_PORT, help=f"TCP port (default {app.DEFAULT_PORT})")
    s.add_argument("--address", help="join the Ray cluster at this address (default $RAY_ADDRESS, else start a "
                                     "local Ray for as long as this runs)")
    return p


def serve(argv: list[str] | None = None) -> int:
    """`flowers-serve`: the model on Ray Serve until Ctrl-C or SIGTERM, which drain the requests in flight."""
    quiet_third_party_warnings()
    import flowers_classifier as fc

    from . import cluster
    from . import serve as app

    args = serve_parser().parse_args(argv)
    threads = args.threads or max(1, len(available_cpus()) // max(1, args.replicas))
    try:
        application = app.build_app(args.model, replicas=args.replicas, max_batch=args.max_batch,
                                    batch_wait_ms=args.batch_wait_ms, threads=threads, backend=args.backend)
        fc.load_model(args.model, backend=args.backend)  # a bad file fails here, not in every replica's retries
        started = cluster.connect(args.address)
    except FlowersError as e:  # ServeConfigError, ModelFileError, BackendError, RayUnavailableError
        print(f"error: {e}", file=sys.stderr)
        return 2
    stop = app.stop_on_signal()
    try:
        url = app.start(application, args.host, args.port)
    except (OSError, RuntimeError) as e:
        print(f"error: cannot serve on {args.host}:{args.port} ({e}). Pass a free --port or another --host.",
              file=sys.stderr)
        app.stop(started)
        return 2
    print(f"serving {args.model} at {url}/predict ({args.replicas} replica(s) of {threads} thread(s)); "
          f"Ctrl-C or SIGTERM stops it", file=sys.stderr, flush=True)
    app.wait_for(stop)
    print("stopping: draining the requests in flight", file=sys.stderr, flush=True)
    app.stop(started)
    return 0


# --------------------------------------------------------------------------- flowers-predict

ENGINES = ("local", "ray")


def predict_parser() -> argparse.ArgumentParser:
    from flowers_classifier.cli import build_parser

    p = build_parser(prog="flowers-predict")
    p.add_argument("--out", type=Path, metavar="FILE", help="also write every record to FILE.csv or FILE.parquet")
    e = p.add_argument_group("engine")
    e.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: this process (default); ray: a Ray Data pipeline (decoding tasks, model actors) on "
                        "a local Ray or the cluster at --address")
    e.add_argument("--address", help="--engine ray: join this Ray cluster (default $RAY_ADDRESS, else a local Ray)")
    e.add_argument("--replicas", type=int, default=1, help="--engine ray: model actors (default 1)")
    e.add_argument("--threads", type=int, help="--engine ray: torch threads per model actor (default: this machine's "
                                               "CPUs divided by --replicas; set it when joining a cluster)")
    return p


def predict(argv: list[str] | None = None) -> int:
    """`flowers-predict`: `python -m flowers_classifier`'s job and records, in this process or on Ray (--engine),
    optionally also as a CSV/Parquet file (--out). Exit codes as there: 0 all predicted, 1 some failed, 2 none ran."""
    from flowers_classifier.cli import check_args, run

    from . import records

    parser = predict_parser()
    args = check_args(parser, parser.parse_args(argv))
    ray_only = [f for f, v in (("--address", args.address), ("--replicas", args.replicas != 1),
                               ("--threads", args.threads is not None)) if v]
    if args.engine != "ray" and ray_only:
        parser.error(f"{', '.join(ray_only)}: only with --engine ray")
    threads = args.threads or max(1, len(available_cpus()) // max(1, args.replicas))
    if args.replicas < 1 or threads < 1:
        parser.error(f"--replicas and --threads must be at least 1, not {args.replicas} and {threads}")
    try:
        out = args.out and records.check_out(args.out)
    except FlowersError as e:
        parser.error(str(e))
    write = (lambda rs: records.write_records(out, rs)) if out else None
    if args.engine == "local":
        return run(args, write=write)
    quiet_third_party_warnings()
    from . import batch, cluster

    try:
        started = cluster.connect(args.address)
    except FlowersError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return run(args, batch.ray_predictions(args.model, backend=args.backend, calibrated=not args.uncalibrated,
                                               replicas=args.replicas, threads=threads), write=write)
    except FlowersError as e:  # RayEngineError: the pipeline failed as a whole
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if started:
            import ray
            ray.shutdown()
