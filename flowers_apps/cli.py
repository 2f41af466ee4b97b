"""Console entry points of the apps (`flowers-demo`; app.py calls it too): parse, then call the app.

Each quiets third-party deprecation noise before importing its app (gradio warns on import)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flowers_classifier.cli import quiet_third_party_warnings
from flowers_classifier.errors import FlowersError


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
