"""Campaign reports as text tables (terminal) and markdown (docs), from the report dicts / JSON files."""
from __future__ import annotations

import json
from pathlib import Path

COLUMNS = ("scenario", "peers", "s", "seed", "faults", "steps", "ok/aborted", "mismatches", "hangs", "loss",
           "kept", "verdict")


def _faults(r: dict) -> str:
    inj = r.get("faults_injected", {})
    text = ", ".join(f"{k} {v}" for k, v in sorted(inj.items())) or "0"
    return text + (f" ({r['faults_skipped']} skipped)" if r.get("faults_skipped") else "")


def _loss(r: dict) -> str:
    parts = [f"{v['first']:.2f}→{v['last']:.2f}" for v in r.get("loss", {}).values() if v.get("first") is not None]
    return ", ".join(parts) or "-"


def _kept(r: dict) -> str:
    kept = r.get("throughput_kept")
    if not kept:
        return "-"
    return ", ".join(f"{k.split('/')[0]} {v:.0%}" for k, v in sorted(kept.items()))


def row(r: dict) -> list[str]:
    steps = f"{r.get('peer_steps', 0)} DiLoCo, {r.get('syncs_completed', 0)} syncs"
    name = r["scenario"] + (" (netns)" if r.get("netns") else "") + (" (warm spares)" if r.get("warm_spares") else "") \
        + (" (zygote)" if r.get("zygote") else "")
    return [name, str(r["peers"]), f"{r['duration']:g}", str(r["seed"]), _faults(r), steps,
            f"{r['collectives_completed']}/{r['collectives_aborted']}", str(r["mismatches"]), str(r["hangs"]),
            _loss(r), _kept(r), "PASS" if r.get("ok") else "FAIL: " + "; ".join(r.get("violations", []))]


def text_table(reports: list[dict]) -> str:
    rows = [list(COLUMNS)] + [row(r) for r in reports]
    widths = [max(len(x[i]) for x in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(x, widths)) for x in rows)


def markdown(reports: list[dict]) -> str:
    head = ("| scenario | peers | seconds | seed | faults injected | steps completed | collectives ok / aborted "
            "| mismatches | hangs | loss first→last | throughput kept | verdict |")
    lines = [head, "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in reports]
    return "\n".join(lines)


def details(r: dict) -> str:
    d = r.get("detection_seconds", {})
    out = [f"rates (per s): {r.get('rates')}"]
    if r.get("baseline"):
        out.append(f"baseline rates (per s): {r['baseline']['rates']}")
    out.append(f"kill → first failure seen by a survivor: {d.get('kill_to_first_failure')}; "
               f"stop → first failure: {d.get('stop_to_first_failure')}; revived peers were told: "
               f"{d.get('revived_peer_told')}")
    out.append(f"fault → next collective completed in the victim's cell (s): {r.get('stall_seconds')}")
    out.append(f"lost communicators: {r.get('lost')}; lost to a master restart: {r.get('lost_to_master_restart')}; "
               f"unexpected exits: {r.get('unexpected_exits')}; settle {r.get('settle_seconds')} s")
    for k in ("mismatch_examples", "hang_examples", "unclear_examples"):
        for ex in r.get(k, []):
            out.append(f"{k[:-9]}: {ex}")
    return "\n".join(out)


def load(paths: list[str]) -> list[dict]:
    reports = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        reports.extend(data if isinstance(data, list) else [data])
    return reports
