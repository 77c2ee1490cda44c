"""The ``pccl`` command: master, launch, bench, bench-sync, bench-wan, demo, status."""
from __future__ import annotations

import argparse
import logging
import sys


def _secret(args: argparse.Namespace) -> bytes | None:
    """The secret from --secret-file (None: PCCL_SECRET, read by pccl.config). Never printed."""
    from pccl.config import read_secret_file

    return read_secret_file(args.secret_file) if args.secret_file else None


def _master(args: argparse.Namespace) -> int:
    import signal

    from pccl.master import Master

    master = Master(args.host, args.port, secret=_secret(args))
    master.bind()
    auth = "peers must prove the shared secret" if master.config.secret is not None else "no authentication"
    print(f"pccl master listening on {master.address} ({auth})", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: master.close())
    try:
        master.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        master.close()
    return 0


def _status(args: argparse.Namespace) -> int:
    from pccl.status import query_status

    print(query_status(args.master, timeout=args.timeout, secret=_secret(args)))
    return 0


def _launch(args: argparse.Namespace) -> int:
    from pccl.launch import launch

    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("pccl launch: give a script to run, e.g. pccl launch -n 4 -- train.py", file=sys.stderr)
        return 2
    secret = _secret(args)
    if secret is not None:  # the started master and every peer read it from the environment, not argv
        import os

        from pccl.errors import InvalidUsage
        try:
            os.environ["PCCL_SECRET"] = secret.decode()
        except UnicodeDecodeError:
            raise InvalidUsage(f"the secret file {args.secret_file} must hold UTF-8 text for launch") from None
    return launch(args.n, cmd, master=args.master, host=args.host)


def _bench(args: argparse.Namespace) -> int:
    from pccl.bench import main as bench_main

    return bench_main(args.rest)


def _bench_sync(args: argparse.Namespace) -> int:
    from pccl.bench_sync import main as bench_sync_main

    return bench_sync_main(args.rest)


def _bench_wan(args: argparse.Namespace) -> int:
    from pccl.bench_wan import main as bench_wan_main

    return bench_wan_main(args.rest)


def _demo(args: argparse.Namespace) -> int:
    if "--allreduce" in args.rest:  # raw all-reduces with exact answers under churn
        from pccl.demo import main as demo_main

        return demo_main([a for a in args.rest if a != "--allreduce"])
    from pccl.demo_train import main as train_main

    return train_main(args.rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pccl", description="fault-tolerant collective communication")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("master", help="run a master in the foreground")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=48148)
    p.add_argument("--secret-file", default=None, metavar="PATH",
                   help="require peers to prove this shared secret (default: $PCCL_SECRET, else none)")
    p.set_defaults(fn=_master)

    p = sub.add_parser("launch", help="start a master (unless --master) and N local peers running a script")
    p.add_argument("-n", type=int, required=True, help="number of peers")
    p.add_argument("--master", default=None, help="use this master (host:port) instead of starting one")
    p.add_argument("--host", default="127.0.0.1", help="where the started master listens")
    p.add_argument("--secret-file", default=None, metavar="PATH",
                   help="shared secret for the master and the peers (passed as $PCCL_SECRET)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- script.py ARGS (a .py file runs with this Python)")
    p.set_defaults(fn=_launch)

    p = sub.add_parser("status", help="print the master's view of the run")
    p.add_argument("--master", required=True)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--secret-file", default=None, metavar="PATH",
                   help="prove this shared secret to the master (default: $PCCL_SECRET, else none)")
    p.set_defaults(fn=_status)

    p = sub.add_parser("bench", help="all-reduce bandwidth against torch.distributed gloo (see pccl bench -h)",
                       add_help=False)
    p.set_defaults(fn=_bench, rest=[])

    p = sub.add_parser("bench-sync", help="shared-state download from several holders vs one (see pccl bench-sync -h)",
                       add_help=False)
    p.set_defaults(fn=_bench_sync, rest=[])

    p = sub.add_parser("bench-wan", help="all-reduce across emulated hosts: quantized vs not, K connections "
                       "vs one (root; see pccl bench-wan -h)", add_help=False)
    p.set_defaults(fn=_bench_wan, rest=[])

    p = sub.add_parser("demo", help="the main job: streaming DiLoCo training under churn (see pccl demo -h; "
                       "--allreduce: raw all-reduces under churn)", add_help=False)
    p.set_defaults(fn=_demo, rest=[])

    argv = list(sys.argv[1:] if argv is None else argv)
    # bench and demo parse their own options: hand them everything after the subcommand.
    for i, a in enumerate(argv):
        if not a.startswith("-"):
            if a in ("bench", "bench-sync", "bench-wan", "demo"):
                args = parser.parse_args(argv[: i + 1])
                args.rest = argv[i + 1:]
                break
            args = parser.parse_args(argv)
            break
    else:
        args = parser.parse_args(argv)
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from pccl.errors import PcclError

    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except PcclError as exc:
        print(f"pccl {args.cmd}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
