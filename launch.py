"""Start the loradesk app in the browser: `python launch.py [--port 7860] [--no-browser] [--share] ...`."""
from __future__ import annotations

import argparse
import os
import socket
import sys

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def free_port(host: str, start: int, tries: int = 100) -> int:
    """The first port from `start` on that nothing listens on."""
    for port in range(start, start + tries):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is free
            try:
                s.bind((host, port))
                return port
            except OSError:
                continue
    sys.exit(f"no free port between {start} and {start + tries - 1}; pass --port with a free one")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="loradesk: train, blend and export LoRA adapters in your browser.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this computer only)")
    p.add_argument("--port", type=int, default=7860, help="first port to try (the next free one is used)")
    p.add_argument("--no-browser", action="store_true", help="do not open the browser")
    p.add_argument("--share", action="store_true", help="make a public gradio.live link (off by default)")
    p.add_argument("--auth", metavar="USER:PASS", help="ask for this user name and password")
    p.add_argument("--data-dir", help="folder of datasets (default: ./datasets)")
    p.add_argument("--runs-dir", help="folder of run folders (default: ./runs)")
    p.add_argument("--adapters-dir", help="folder of uploaded and exported adapters (default: ./adapters)")
    p.add_argument("--base-model", help="default base model (default: the tiny built-in model; "
                                        "or set LORADESK_BASE_MODEL)")
    args = p.parse_args(argv)
    if args.auth and ":" not in args.auth:
        p.error("--auth needs USER:PASS, for example --auth me:secret")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from app.main import build_app, launch_options
    from app.settings import AppSettings

    settings = AppSettings.from_env(data_dir=args.data_dir, runs_dir=args.runs_dir, adapters_dir=args.adapters_dir,
                                    base_model=args.base_model)
    if args.host not in LOCAL_HOSTS:
        print(f"WARNING: listening on {args.host} lets other computers on the network use this app"
              f"{'' if args.auth else ' without a password (add --auth user:pass)'}.", file=sys.stderr)
    port = free_port(args.host, args.port)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    demo = build_app(settings)
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=args.host, server_port=port, share=args.share, inbrowser=not args.no_browser,
                auth=auth, **launch_options(settings))


if __name__ == "__main__":
    main()
