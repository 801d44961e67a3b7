"""Start the loradesk app in the browser: `python launch.py [--port 7860] [--no-browser] [--share] ...`."""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

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
    p.add_argument("--auth", metavar="USER:PASS", help="ask for this user name and password (visible in the shell "
                                                       "history: prefer --auth-file or LORADESK_AUTH)")
    p.add_argument("--auth-file", metavar="FILE", help="a file of USER:PASS lines ('#' starts a comment)")
    p.add_argument("--trusted-proxy", metavar="ADDR",
                   help="the address of a reverse proxy in front of the app (comma-separated for more): its "
                        "X-Forwarded-For header then names the client, for the login throttle. By default the "
                        "connecting address counts, whatever headers it sends")
    p.add_argument("--allow-import", metavar="DIR", action="append",
                   help="a server folder the page may import datasets from and train on (repeat for more; or set "
                        "LORADESK_IMPORT_DIRS); by default only the data folder and the shipped examples")
    p.add_argument("--data-dir", help="folder of datasets (default: ./datasets)")
    p.add_argument("--runs-dir", help="folder of run folders (default: ./runs)")
    p.add_argument("--adapters-dir", help="folder of uploaded and exported adapters (default: ./adapters)")
    p.add_argument("--base-model", help="default base model (default: the tiny built-in model; "
                                        "or set LORADESK_BASE_MODEL)")
    args = p.parse_args(argv)
    if args.auth and ":" not in args.auth:
        p.error("--auth needs USER:PASS, for example --auth me:secret")
    return args


def read_auth(args: argparse.Namespace) -> list[tuple[str, str]] | None:
    """(user, password) pairs from --auth, else --auth-file, else LORADESK_AUTH (USER:PASS); None: no login."""
    if args.auth:
        lines, where = [args.auth], "--auth"
    elif args.auth_file:
        try:
            lines, where = Path(args.auth_file).expanduser().read_text(encoding="utf-8").splitlines(), args.auth_file
        except (OSError, UnicodeDecodeError) as e:
            sys.exit(f"--auth-file {args.auth_file} cannot be read ({getattr(e, 'strerror', None) or e}); "
                     f"give a text file of USER:PASS lines")
    elif os.environ.get("LORADESK_AUTH"):
        lines, where = [os.environ["LORADESK_AUTH"]], "LORADESK_AUTH"
    else:
        return None
    pairs = [tuple(line.strip().split(":", 1)) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not pairs or any(len(pair) != 2 or not pair[0] for pair in pairs):
        sys.exit(f"{where}: every line must be USER:PASS, for example me:secret")
    return pairs


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from app.auth import app_kwargs, trust_forwarded_for
    from app.main import build_app, launch_options
    from app.settings import AppSettings

    settings = AppSettings.from_env(data_dir=args.data_dir, runs_dir=args.runs_dir, adapters_dir=args.adapters_dir,
                                    base_model=args.base_model, import_dirs=args.allow_import)
    auth = read_auth(args)
    if args.host not in LOCAL_HOSTS:
        print(f"WARNING: listening on {args.host} lets other computers on the network use this app"
              f"{'' if auth else ' without a password (add --auth-file FILE)'}.", file=sys.stderr)
    port = free_port(args.host, args.port)
    trust_forwarded_for(args.trusted_proxy)
    demo = build_app(settings)
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=args.host, server_port=port, share=args.share, inbrowser=not args.no_browser,
                auth=auth, app_kwargs=app_kwargs(), **launch_options(settings))


if __name__ == "__main__":
    main()
