"""``python -m chaos run --scenario NAME --peers N --duration S --seed X [--json PATH] [--baseline]``
and ``python -m chaos report FILES... [--md]``. Exit status 1 when an invariant is violated,
2 when the campaign could not run."""
from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import replace

from chaos import report as rep
from chaos import schedule


def _run(a: argparse.Namespace) -> int:
    from chaos.campaign import CampaignError, Options, run_campaign

    knobs = schedule.Knobs()
    changes = {k: getattr(a, k) for k in ("kill_every", "stop_every", "join_every", "link_every", "mix_every",
                                          "master_every") if getattr(a, k) is not None}
    knobs = replace(knobs, **changes)
    opts = Options(scenario=a.scenario, peers=a.peers, duration=a.duration, seed=a.seed, workload=a.workload,
                   netns=a.netns, with_master_restart=a.with_master_restart,
                   expect_ride_through=a.expect_ride_through, knobs=knobs, slack=a.slack, log_dir=a.log_dir,
                   quiet=a.quiet, warm_spares=a.warm_spares, zygote=a.zygote)
    print(f"chaos seed {a.seed}", flush=True)

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        r = run_campaign(opts, baseline=a.baseline)
    except CampaignError as exc:
        print(f"chaos: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"chaos: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chaos: interrupted; every process was stopped", file=sys.stderr)
        return 130
    r["command"] = "python -m chaos " + " ".join(sys.argv[1:])
    print()
    print(rep.text_table([r]))
    print(rep.details(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
        print(f"report written to {a.json}")
    print("VERDICT: " + ("PASS" if r["ok"] else "FAIL - " + "; ".join(r["violations"])))
    return 0 if r["ok"] else 1


def _report(a: argparse.Namespace) -> int:
    reports = rep.load(a.files)
    print(rep.markdown(reports) if a.md else rep.text_table(reports))
    if a.md and a.commands:
        print()
        for r in reports:
            if r.get("command"):
                print(f"* `{r['command']}`")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos", description="fault-injection campaigns against pccl")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run one campaign")
    r.add_argument("--scenario", default="mix", choices=list(schedule.SCENARIOS))
    r.add_argument("--peers", type=int, default=4)
    r.add_argument("--duration", type=float, default=60.0, help="seconds of faults after every peer joined")
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--workload", default="both", choices=("allreduce", "diloco", "both"))
    r.add_argument("--json", help="write the report here")
    r.add_argument("--baseline", action="store_true", help="first run the same seed and length without faults")
    r.add_argument("--netns", action="store_true", help="peers in network namespaces (root); mix adds link faults")
    r.add_argument("--with-master-restart", action="store_true", help="mix: include master restarts")
    r.add_argument("--warm-spares", action="store_true",
                   help="replace a killed peer by a pre-started one (imports and set-up done): pccl's recovery "
                        "without the process start-up time")
    r.add_argument("--zygote", action="store_true",
                   help="fork every peer from one process that did the imports once (chaos.zygote): a "
                        "replacement starts in milliseconds instead of paying python/torch start-up")
    r.add_argument("--expect-ride-through", action="store_true",
                   help="a peer losing its communicator to a master restart is a violation")
    for k in ("kill_every", "stop_every", "join_every", "link_every", "mix_every", "master_every"):
        r.add_argument("--" + k.replace("_", "-"), dest=k, type=float, default=None)
    r.add_argument("--slack", type=float, default=10.0, help="seconds over a deadline before a call is a hang")
    r.add_argument("--log-dir", default=None, help="peer/master logs and events.jsonl (default: a temp dir)")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(fn=_run)
    rp = sub.add_parser("report", help="render JSON reports as a table")
    rp.add_argument("files", nargs="+")
    rp.add_argument("--md", action="store_true", help="markdown")
    rp.add_argument("--commands", action="store_true", help="with --md: list the commands below the table")
    rp.set_defaults(fn=_report)
    a = p.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
