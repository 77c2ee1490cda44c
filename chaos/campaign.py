"""The campaign controller: masters, peer processes, the fault schedule, and the verdict.

How it works
1. Cells. A cell is one master process (``pccl master``, so it can be SIGKILLed) and its peer
   slots, all running one workload. ``--workload both`` runs two cells side by side (raw
   all-reduces and DiLoCo), each with its own master: pccl's topology vote spans every group of
   one master, so two workloads under one master would wait on each other's votes.
2. Slots. Each slot holds one peer process at a time (``python -m chaos.workload``, its own
   process group, inside its namespace with ``--netns``). A killed or crashed peer is replaced in
   its slot; join-storm newcomers get extra slots that leave after their lifetime.
3. Clock. After every initial peer joined and each cell's world is complete ("settled"), the
   faults of ``schedule.plan`` are injected at their offsets; the run lasts ``duration`` seconds
   from there. A fault's victim is ``pick % len(eligible)`` among the peers that are joined, not
   frozen and not the last ready peer of their cell (the state must survive somewhere); with none
   eligible the fault is recorded as skipped.
4. Epochs. Each cell has an epoch in a file its peers read after every ``connect()``; it goes up
   when a new master starts and when a peer is spawned into a cell with no live peer, so record
   keys of an earlier master or an extinct group never meet newer ones.
5. Records. Every peer line is tagged with cell, slot and arrival time and kept (also written to
   ``events.jsonl``); the controller adds ``fault``, ``silent`` (a running, unfrozen peer silent
   past ``silence_limit``), ``no_exit`` (a peer that did not exit within its deadline after
   SIGTERM) and ``exited`` records. ``invariants.check`` turns them into the verdict.
6. Cleanup. Every process is in its own group; ``close()`` (also on Ctrl-C and exceptions)
   SIGCONTs and SIGKILLs every group, stops the masters and removes the namespaces. Children also
   get PR_SET_PDEATHSIG, so even a SIGKILLed controller leaves no process behind.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from chaos import invariants, netfaults, schedule
from chaos import zygote as zygote_mod

REPO = Path(__file__).resolve().parent.parent
NETNS_PREFIX = "chaos"
#: Campaign defaults for pccl's timeouts (shorter than the library's, so a deadline is meaningful
#: inside a one-minute run); a PCCL_* variable already in the environment wins.
CONFIG_DEFAULTS = {"PCCL_OP_TIMEOUT": "20", "PCCL_TOPOLOGY_TIMEOUT": "20", "PCCL_JOIN_TIMEOUT": "60",
                   "PCCL_REQUEST_TIMEOUT": "10"}


class CampaignError(Exception):
    """The campaign could not run (a tool is missing, the peers never settled, ...)."""


@dataclass
class Options:
    scenario: str = "mix"
    peers: int = 4
    duration: float = 60.0
    seed: int = 1
    workload: str = "both"
    netns: bool = False
    with_master_restart: bool = False
    expect_ride_through: bool = False
    knobs: schedule.Knobs = field(default_factory=schedule.Knobs)
    slack: float = 10.0
    settle_timeout: float = 600.0
    silence_limit: float = 60.0
    elems: int = 1 << 18
    ops_per_sync: int = 4
    sync_every: int = 10
    log_dir: str | None = None
    quiet: bool = False
    #: keep one pre-started peer per cell (imports, data and model done, waiting on stdin) to replace
    #: a killed peer: measures pccl's recovery without the process start-up cost
    warm_spares: bool = False
    #: fork every peer from one pre-imported process (chaos.zygote) instead of starting python anew
    zygote: bool = False


@dataclass
class Slot:
    index: int
    cell: "Cell"
    host: int = 0            # netns host number (0: root namespace / loopback)
    extra: bool = False      # a join-storm newcomer (not replaced when it exits)
    proc: subprocess.Popen | zygote_mod.Forked | None = None
    generation: int = 0
    joined: bool = False     # has reported progress since its last spawn / revival
    stopped: bool = False
    terminating: bool = False
    last_line: float = 0.0
    silent_reported: bool = False
    started: bool = False    # has printed its first record (start-up, e.g. import torch, is not a hang)
    expires: float = 0.0     # join-storm: when to SIGTERM
    linkfault: tuple | None = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Cell:
    index: int
    workload: str
    host: str
    port: int = 0
    master: subprocess.Popen | None = None
    master_up: bool = False
    epoch: int = 0
    epoch_file: str = ""
    size: int = 0            # initial peers
    restart_at: float = 0.0  # when a killed master is started again

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Campaign:
    def __init__(self, opts: Options, faults: list[schedule.Fault] | None = None) -> None:
        self.o = opts
        self.faults = schedule.plan(opts.scenario, opts.seed, opts.duration, opts.peers, opts.knobs,
                                    netns=opts.netns, with_master_restart=opts.with_master_restart) \
            if faults is None else faults
        self.log_dir = Path(opts.log_dir or tempfile.mkdtemp(prefix="pccl-chaos-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.lossy_backend = netfaults.lossy_backend()
        self.events: list[dict] = []
        self.q: queue.Queue[tuple[int, dict]] = queue.Queue()
        self.cells: list[Cell] = []
        self.slots: list[Slot] = []
        self.hosts = None
        self.peer_log = open(self.log_dir / "peers.log", "a")
        self.master_log = open(self.log_dir / "masters.log", "a")
        self.events_file = open(self.log_dir / "events.jsonl", "w")
        self.injected: dict[str, int] = {}
        self.skipped: list[dict] = []
        self.timers: list[tuple[float, str, object]] = []
        self.unexpected_exits = 0
        self.closed = False
        self.t_fault = 0.0
        self.bind: dict[int, tuple[int, int]] = {}  # pid -> (slot index, generation)
        self.spares: dict[int, subprocess.Popen] = {}  # cell index -> a warm spare
        self.spare_ready: set[int] = set()
        self.spare_serial = 0
        self.spare_procs: list[subprocess.Popen] = []
        self.zygote: zygote_mod.Zygote | None = None

    # ------------------------------------------------------------------ small helpers
    def say(self, text: str) -> None:
        if not self.o.quiet:
            print(text, flush=True)

    def record(self, ev: str, **fields) -> dict:
        fields["ev"] = ev
        fields.setdefault("t", time.time())
        self.events.append(fields)
        self.events_file.write(json.dumps(fields) + "\n")
        return fields

    def env(self, cell: Cell | None) -> dict[str, str]:
        env = dict(os.environ)
        for k, v in CONFIG_DEFAULTS.items():
            env.setdefault(k, v)
        env.update(PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        if cell is not None:
            env.update(self.cell_env(cell))
        return env

    @staticmethod
    def cell_env(cell: Cell) -> dict[str, str]:
        return {"PCCL_MASTER": cell.address, "CHAOS_EPOCH_FILE": cell.epoch_file}

    def config_value(self, name: str) -> float:
        import pccl

        return float(getattr(pccl.Config.from_env({**CONFIG_DEFAULTS, **{k: v for k, v in os.environ.items()
                                                                         if k.startswith("PCCL_")}}), name))

    # ------------------------------------------------------------------ masters
    def start_master(self, cell: Cell) -> None:
        cell.epoch += 1
        Path(cell.epoch_file).write_text(str(cell.epoch))
        cmd = [sys.executable, "-m", "pccl.cli", "master", "--host", cell.host, "--port", str(cell.port)]
        cell.master = subprocess.Popen(cmd, env=self.env(cell), stdout=subprocess.PIPE, stderr=self.master_log,
                                       stdin=subprocess.DEVNULL, text=True, start_new_session=True, cwd=REPO,
                                       preexec_fn=zygote_mod.die_with_parent)
        deadline = time.monotonic() + 30.0
        line = ""
        ready = threading.Event()

        def first_line() -> None:
            nonlocal line
            assert cell.master is not None and cell.master.stdout is not None
            line = cell.master.stdout.readline()
            ready.set()
            for _ in cell.master.stdout:  # keep the pipe drained
                pass

        threading.Thread(target=first_line, daemon=True).start()
        if not ready.wait(max(0.0, deadline - time.monotonic())) or "listening" not in line:
            raise CampaignError(f"master of cell {cell.index} did not start on {cell.address} "
                                f"(see {self.log_dir / 'masters.log'})")
        cell.master_up = True

    def kill_master(self, cell: Cell) -> None:
        if cell.master is not None and cell.master.poll() is None:
            os.killpg(cell.master.pid, signal.SIGKILL)
            cell.master.wait(10)
        cell.master_up = False

    # ------------------------------------------------------------------ peers
    def command(self, cell: Cell, slot_arg: int, spare: bool) -> list[str]:
        return [sys.executable, "-m", "chaos.workload"] + self.workload_args(cell, slot_arg, spare)

    def workload_args(self, cell: Cell, slot_arg: int, spare: bool) -> list[str]:
        o = self.o
        args = ["--workload", cell.workload, "--slot", str(slot_arg), "--seed", str(o.seed), "--slack", str(o.slack),
                "--elems", str(o.elems), "--ops-per-sync", str(o.ops_per_sync), "--sync-every", str(o.sync_every)]
        return args + (["--spare"] if spare else [])

    def spawn(self, slot: Slot) -> None:
        cell = slot.cell
        if not any(s.alive() for s in self.slots if s.cell is cell and s is not slot):
            if any(e.get("cell") == cell.index and e.get("ev") in ("op", "step", "sync") for e in self.events):
                cell.epoch += 1  # the cell lost every peer: a new lineage starts
                Path(cell.epoch_file).write_text(str(cell.epoch))
        slot.generation += 1
        spare = self.spares.pop(cell.index, None) if not slot.extra else None
        if spare is not None and spare.poll() is None:
            self.bind[spare.pid] = (slot.index, slot.generation)
            assert spare.stdin is not None
            spare.stdin.write(f"{slot.index}\n")
            spare.stdin.flush()
            slot.proc = spare
            self.start_spare(cell)
        elif self.zygote is not None:
            try:
                slot.proc = self.zygote.fork(self.workload_args(cell, slot.index, spare=False), self.cell_env(cell))
            except zygote_mod.ZygoteError as exc:
                raise CampaignError(f"cannot start the peer of slot {slot.index}: {exc}") from exc
            self.bind[slot.proc.pid] = (slot.index, slot.generation)
        else:
            cmd = self.command(cell, slot.index, spare=False)
            if self.hosts is not None and slot.host:
                cmd = self.hosts.argv(slot.host, cmd)
            slot.proc = subprocess.Popen(cmd, env=self.env(cell), stdout=subprocess.PIPE, stderr=self.peer_log,
                                         stdin=subprocess.DEVNULL, text=True, start_new_session=True, cwd=REPO,
                                         preexec_fn=zygote_mod.die_with_parent)
            self.bind[slot.proc.pid] = (slot.index, slot.generation)
            threading.Thread(target=self._read, args=(slot.proc,), daemon=True).start()
        slot.joined = slot.stopped = slot.terminating = slot.silent_reported = slot.started = False
        slot.last_line = time.monotonic()

    def start_spare(self, cell: Cell) -> None:
        """A peer process that did its imports and set-up and waits on stdin for its slot."""
        if not self.o.warm_spares or self.closed:
            return
        self.spare_serial += 1
        cmd = self.command(cell, 1000 + self.spare_serial, spare=True)
        p = subprocess.Popen(cmd, env=self.env(cell), stdout=subprocess.PIPE, stderr=self.peer_log,
                             stdin=subprocess.PIPE, text=True, start_new_session=True, cwd=REPO,
                             preexec_fn=zygote_mod.die_with_parent)
        self.spares[cell.index] = p
        self.spare_procs.append(p)
        threading.Thread(target=self._read, args=(p,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict):
                self.q.put((proc.pid, ev))

    def drain(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while True:
            try:
                pid, ev = self.q.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                return
            if pid not in self.bind:  # a warm spare not yet in a slot
                if ev.get("ev") == "spare_ready":
                    self.spare_ready.add(pid)
                continue
            index, gen = self.bind[pid]
            slot = self.slots[index]
            ev["cell"], ev["slot"], ev["gen"], ev["rt"] = slot.cell.index, index, gen, time.time()
            self.events.append(ev)
            self.events_file.write(json.dumps(ev) + "\n")
            if gen == slot.generation:
                slot.last_line = time.monotonic()
                slot.silent_reported = False
                slot.started = True
                if ev.get("ev") in ("joined", "op", "step", "sync", "outer"):
                    slot.joined = True
                elif ev.get("ev") == "lost":
                    slot.joined = False

    def signal(self, slot: Slot, sig: int) -> None:
        if slot.alive():
            assert slot.proc is not None
            try:
                os.killpg(slot.proc.pid, sig)
            except ProcessLookupError:
                pass

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        o = self.o
        kinds = {f.kind for f in self.faults}
        if o.warm_spares and (o.netns or kinds & set(schedule.NETNS_KINDS)):
            raise CampaignError("--warm-spares works on loopback only (a spare would have to be in the victim's namespace)")
        if o.zygote and (o.netns or kinds & set(schedule.NETNS_KINDS) or o.warm_spares):
            raise CampaignError("--zygote works on loopback only and without --warm-spares")
        if o.netns or kinds & set(schedule.NETNS_KINDS):
            why = netfaults.problem(kinds)
            if why:
                raise CampaignError(f"scenario {o.scenario}: {why}")
        workloads = {"allreduce": ["allreduce"], "diloco": ["diloco"], "both": ["allreduce", "diloco"]}[o.workload]
        if o.peers < len(workloads):
            workloads = workloads[:o.peers]
        sizes = [o.peers // len(workloads) + (1 if i < o.peers % len(workloads) else 0) for i in range(len(workloads))]
        storm = max((f.count for f in self.faults if f.kind == "join"), default=0)
        if o.netns or kinds & set(schedule.NETNS_KINDS):
            from pccl import netem

            last: Exception | None = None
            for subnet in (77, 78, 79, 80):
                try:
                    self.hosts = netem.up(o.peers + storm, NETNS_PREFIX, subnet=subnet)
                    break
                except netem.NetemError as exc:
                    last = exc
            if self.hosts is None:
                raise CampaignError(f"could not build network namespaces: {last}")
        host = self.hosts.address(0) if self.hosts is not None else "127.0.0.1"
        for i, w in enumerate(workloads):
            cell = Cell(i, w, host, _free_port(host), size=sizes[i],
                        epoch_file=str(self.log_dir / f"epoch-{i}"))
            self.cells.append(cell)
            self.start_master(cell)
        if o.zygote:
            try:
                torch_too = any(c.workload == "diloco" for c in self.cells)
                self.zygote = zygote_mod.Zygote(self.env(None), self.peer_log, lambda pid, ev: self.q.put((pid, ev)),
                                                torch_too, ready_timeout=o.settle_timeout)
            except zygote_mod.ZygoteError as exc:
                raise CampaignError(f"{exc} (see {self.log_dir / 'peers.log'})") from exc
            self.record("zygote_ready", seconds=self.zygote.ready_seconds)
        n = 0
        for cell in self.cells:
            for _ in range(cell.size):
                self.slots.append(Slot(n, cell, host=n + 1 if self.hosts is not None else 0))
                n += 1
        for slot in self.slots:
            self.spawn(slot)

    def settle(self) -> float:
        t0 = time.monotonic()
        while True:
            self.drain(0.2)
            done = True
            for cell in self.cells:
                mine = [s for s in self.slots if s.cell is cell]
                full = any(e.get("cell") == cell.index and e.get("world", 0) >= cell.size for e in self.events[-400:])
                done = done and all(s.joined for s in mine) and full
            if done and not self.spares_warming():
                return time.monotonic() - t0
            if time.monotonic() - t0 > self.o.settle_timeout:
                raise CampaignError(f"the initial peers did not all join within {self.o.settle_timeout:.0f} s "
                                    f"(see {self.log_dir / 'peers.log'})")
            for s in self.slots:
                if not s.alive():
                    raise CampaignError(f"peer in slot {s.index} exited during start-up with code "
                                        f"{s.proc.returncode if s.proc else '?'} (see {self.log_dir / 'peers.log'})")

    def spares_warming(self) -> bool:
        if self.o.warm_spares and not self.spares:
            for cell in self.cells:
                self.start_spare(cell)
        return any(p.pid not in self.spare_ready and p.poll() is None for p in self.spares.values())

    # ------------------------------------------------------------------ faults
    def eligible(self, cell: Cell | None = None) -> list[Slot]:
        out = []
        for s in self.slots:
            if s.extra or not s.alive() or not s.joined or s.stopped or s.terminating or s.linkfault:
                continue
            if not s.cell.master_up or (cell is not None and s.cell is not cell):
                continue
            # Joiners of a storm (extra slots) leave on their own schedule, so they never count as
            # the peer that keeps the cell's state alive.
            ready = [x for x in self.slots if x.cell is s.cell and x.alive() and x.joined and not x.stopped
                     and not x.terminating and not x.linkfault and not x.extra]
            if len(ready) >= 2:
                out.append(s)
        return out

    def inject(self, f: schedule.Fault, now: float) -> None:
        o = self.o
        self.t_fault = time.time()  # before the signal: peers may report the failure before we log it
        if f.kind == "master":
            up = [c for c in self.cells if c.master_up]
            if not up:
                return self.skip(f, "every master is down already")
            cell = up[f.pick % len(up)]
            self.kill_master(cell)
            cell.restart_at = now + f.duration
            self.timers.append((cell.restart_at, "master", cell))
            for s in self.slots:
                if s.cell is cell:
                    s.joined = False
            self.count(f, cell=cell.index, slot=None)
            return
        if f.kind == "join":
            n0 = len(self.slots)
            for k in range(f.count):
                cell = self.cells[(f.pick + k) % len(self.cells)]
                host = 0
                if self.hosts is not None:
                    host = o.peers + 1 + k
                slot = Slot(n0 + k, cell, host=host, extra=True, expires=now + f.duration)
                self.slots.append(slot)
                self.spawn(slot)
                self.timers.append((slot.expires, "leave", slot))
            self.count(f, cell=None, slot=list(range(n0, n0 + f.count)))
            return
        cands = self.eligible()
        if not cands:
            return self.skip(f, "no eligible peer (each cell keeps one ready peer)")
        victim = cands[f.pick % len(cands)]
        if f.kind == "kill":
            self.signal(victim, signal.SIGKILL)
            assert victim.proc is not None
            victim.proc.wait(10)
            self.count(f, cell=victim.cell.index, slot=victim.index)
            self.spawn(victim)
        elif f.kind == "stop":
            self.signal(victim, signal.SIGSTOP)
            victim.stopped = True
            victim.joined = False
            self.timers.append((now + f.duration, "cont", victim))
            self.count(f, cell=victim.cell.index, slot=victim.index)
        elif f.kind in schedule.NETNS_KINDS:
            if self.hosts is None or not victim.host:
                return self.skip(f, "link faults need --netns")
            netfaults.run(netfaults.apply_cmds(f.kind, NETNS_PREFIX, victim.host, f.param, self.lossy_backend))
            victim.linkfault = (f.kind, f.param)
            self.timers.append((now + f.duration, "restore", victim))
            self.count(f, cell=victim.cell.index, slot=victim.index)

    def count(self, f: schedule.Fault, cell, slot) -> None:
        self.injected[f.kind] = self.injected.get(f.kind, 0) + 1
        self.record("fault", t=self.t_fault, kind=f.kind, at=f.at, duration=f.duration, param=f.param, count=f.count,
                    cell=cell, slot=slot)
        self.say(f"  [{f.at:6.1f}s] {f.kind}" + (f" slot {slot}" if slot is not None else "") +
                 (f" for {f.duration:.1f}s" if f.kind not in ("kill",) else ""))

    def skip(self, f: schedule.Fault, why: str) -> None:
        self.skipped.append({**f.to_json(), "why": why})
        self.record("fault_skipped", kind=f.kind, at=f.at, why=why)

    def run_timers(self, now: float) -> None:
        due = [t for t in self.timers if t[0] <= now]
        self.timers = [t for t in self.timers if t[0] > now]
        for _, what, obj in due:
            if what == "cont" and isinstance(obj, Slot):
                self.signal(obj, signal.SIGCONT)
                obj.stopped = False
                obj.last_line = time.monotonic()
                self.record("resumed", cell=obj.cell.index, slot=obj.index)
            elif what == "leave" and isinstance(obj, Slot):
                obj.terminating = True
                obj.expires = now
                self.signal(obj, signal.SIGTERM)
            elif what == "restore" and isinstance(obj, Slot) and obj.linkfault:
                kind, param = obj.linkfault
                extra: dict = {}
                if kind == "lossy" and self.lossy_backend == "taildrop":
                    text = netfaults.output(netfaults.stats_cmds(NETNS_PREFIX, obj.host))
                    extra["packets"], extra["dropped"] = netfaults.parse_drops(text)
                    self.say(f"  lossy link of slot {obj.index}: {extra['dropped']} of {extra['packets']} packets dropped")
                netfaults.run(netfaults.restore_cmds(kind, NETNS_PREFIX, obj.host, param, self.lossy_backend),
                              check=False)
                obj.linkfault = None
                self.record("restored", kind=kind, cell=obj.cell.index, slot=obj.index, **extra)
            elif what == "master" and isinstance(obj, Cell):
                self.start_master(obj)
                self.record("master_started", cell=obj.index, epoch=obj.epoch)

    def watch_processes(self, now: float) -> None:
        for s in self.slots:
            if s.proc is None:
                continue
            if s.proc.poll() is not None:
                if s.extra or s.terminating:
                    continue
                code = s.proc.returncode
                self.unexpected_exits += 1
                self.record("exited", cell=s.cell.index, slot=s.index, code=code)
                self.say(f"  slot {s.index} exited with code {code}; respawning")
                self.spawn(s)
                continue
            if s.stopped or not s.started:
                continue
            if time.monotonic() - s.last_line > self.o.silence_limit and not s.silent_reported:
                s.silent_reported = True
                self.record("silent", cell=s.cell.index, slot=s.index,
                            detail=f"no record for {self.o.silence_limit:.0f} s while running and not frozen")

    # ------------------------------------------------------------------ main
    def run(self) -> dict:
        o = self.o
        t_setup = time.monotonic()
        try:
            self.setup()
            self.say(f"chaos: scenario {o.scenario}, {o.peers} peers ({', '.join(f'{c.workload} x{c.size}' for c in self.cells)}), "
                     f"{o.duration:g}s, seed {o.seed}: {len(self.faults)} faults planned "
                     f"{schedule.counts(self.faults)}; logs in {self.log_dir}")
            settle_s = self.settle()
            t0, m0 = time.time(), time.monotonic()
            self.record("settled", seconds=settle_s)
            self.say(f"  settled after {settle_s:.1f}s")
            pending = list(self.faults)
            last_status = m0
            while (now := time.monotonic()) < m0 + o.duration:
                self.drain(0.1)
                now = time.monotonic()
                while pending and m0 + pending[0].at <= now:
                    self.inject(pending.pop(0), now)
                self.run_timers(now)
                self.watch_processes(now)
                if not o.quiet and now - last_status >= 15.0:
                    last_status = now
                    s = invariants.check(self.events, o.slack)
                    self.say(f"  [{now - m0:5.0f}s] collectives {s['collectives_completed']}, peer steps "
                             f"{s['peer_steps']}, aborted {s['collectives_aborted']}, mismatches {s['mismatches']}, "
                             f"hangs {s['hangs']}")
            t1 = time.time()
            self.record("end")
            self.shutdown()
            return self.summarize(t0, t1, settle_s, time.monotonic() - t_setup)
        finally:
            self.close()

    def shutdown(self) -> None:
        """SIGCONT the frozen, restore links, SIGTERM everyone, wait within the deadlines."""
        self.run_timers(float("inf"))
        for cell in self.cells:
            if not cell.master_up:
                self.start_master(cell)
        for s in self.slots:
            if s.alive():
                s.terminating = True
                self.signal(s, signal.SIGTERM)
        grace = (self.config_value("op_timeout") * 2 + self.config_value("topology_timeout")
                 + self.config_value("peer_timeout") + self.o.slack)
        end = time.monotonic() + grace
        while time.monotonic() < end and any(s.alive() for s in self.slots):
            self.drain(0.2)
        for s in self.slots:
            if s.alive():
                self.record("no_exit", cell=s.cell.index, slot=s.index,
                            detail=f"did not exit within {grace:.0f} s of SIGTERM")
                self.signal(s, signal.SIGKILL)
        self.drain(0.5)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        procs = [s.proc for s in self.slots if s.proc is not None] + self.spare_procs
        for p in procs:
            if p.poll() is None:
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    try:
                        os.killpg(p.pid, sig)
                    except ProcessLookupError:
                        pass
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if self.zygote is not None:
            self.zygote.close()
        for cell in self.cells:
            self.kill_master(cell)
        if self.hosts is not None:
            try:
                self.hosts.down()
            except Exception as exc:  # noqa: BLE001 - cleanup must go on; say what is left
                print(f"chaos: could not remove namespaces: {exc}", file=sys.stderr)
        for f in (self.peer_log, self.master_log, self.events_file):
            f.close()

    # ------------------------------------------------------------------ verdict
    def summarize(self, t0: float, t1: float, settle_s: float, wall: float) -> dict:
        o = self.o
        s = invariants.check(self.events, o.slack)
        rates = invariants.work_rate(self.events, t0, t1)
        det = detection(self.events)
        restarts = [e for e in self.events if e.get("ev") == "fault" and e.get("kind") == "master"]
        lost_master = sum(1 for e in self.events if e.get("ev") == "lost" and any(
            r["cell"] == e.get("cell") and r["t"] <= e["t"] <= r["t"] + r["duration"] + 20.0 for r in restarts))
        gsteps = [e.get("gstep", 0) for e in self.events if e.get("ev") == "step"]
        report = {
            "scenario": o.scenario, "seed": o.seed, "peers": o.peers, "duration": o.duration,
            "workload": o.workload, "netns": o.netns or self.hosts is not None,
            "cells": [{"workload": c.workload, "peers": c.size} for c in self.cells],
            "faults_planned": len(self.faults), "faults_injected": dict(self.injected),
            "faults_injected_total": sum(self.injected.values()), "faults_skipped": len(self.skipped),
            "settle_seconds": round(settle_s, 1), "wall_seconds": round(wall, 1),
            "max_global_step": max(gsteps, default=0),
            **s,
            "rates": {k: round(v, 3) for k, v in rates.items()},
            "detection_seconds": det,
            "lost_to_master_restart": lost_master,
            "unexpected_exits": self.unexpected_exits,
            "log_dir": str(self.log_dir),
            "warm_spares": o.warm_spares,
            "zygote": o.zygote,
            "replacement_seconds": replacement_times(self.events),
            "stall_seconds": stall_times(self.events),
        }
        violations = []
        if s["mismatches"]:
            violations.append(f"{s['mismatches']} mismatches")
        if s["hangs"]:
            violations.append(f"{s['hangs']} hangs")
        if s["unclear_errors"]:
            violations.append(f"{s['unclear_errors']} unclear errors")
        if s["loss_falling"] is False:
            violations.append("training loss did not fall")
        if o.expect_ride_through and lost_master:
            violations.append(f"{lost_master} peers lost their communicator to a master restart")
        report["violations"] = violations
        report["ok"] = not violations
        return report


def detection(events: list[dict]) -> dict:
    """Per fault kind (kill, stop): seconds from the fault to the first failure another peer of the
    cell reported, and for stops what the revived peer was told (its next ``lost`` record)."""
    out: dict[str, list[float]] = {"kill": [], "stop": []}
    told: dict[str, int] = {}
    faults = [e for e in events if e.get("ev") == "fault" and e.get("kind") in out]
    for f in faults:
        later = [e["t"] - f["t"] for e in events if e.get("ev") == "fail" and e.get("cell") == f["cell"]
                 and e.get("slot") != f["slot"] and f["t"] < e["t"] < f["t"] + 60.0]
        if later:
            out[f["kind"]].append(min(later))
        if f["kind"] == "stop":
            nxt = [e for e in events if e.get("ev") == "lost" and e.get("slot") == f["slot"]
                   and f["t"] < e["t"] < f["t"] + f["duration"] + 30.0]
            key = nxt[0].get("error", "?") if nxt else "not removed"
            told[key] = told.get(key, 0) + 1

    def stats(v: list[float]) -> dict:
        v = sorted(v)
        return {"n": len(v), "median": round(v[len(v) // 2], 2) if v else None,
                "max": round(v[-1], 2) if v else None}

    return {"kill_to_first_failure": stats(out["kill"]), "stop_to_first_failure": stats(out["stop"]),
            "revived_peer_told": told}


def stall_times(events: list[dict]) -> dict:
    """Per fault kind: seconds from the fault to the next collective completed in the victim's cell
    (an all-reduce or a DiLoCo outer step by another peer): pccl's own recovery pause, apart from the
    replacement's start-up."""
    done = sorted((e["t"], e["cell"], e.get("slot")) for e in events if e.get("ev") in ("op", "step") and "cell" in e)
    out: dict[str, list[float]] = {}
    for f in (e for e in events if e.get("ev") == "fault" and e.get("kind") in ("kill", "stop", "partition", "master")):
        nxt = next((t for t, c, slot in done if c == f["cell"] and slot != f["slot"] and t > f["t"]), None)
        if nxt is not None:
            out.setdefault(f["kind"], []).append(round(nxt - f["t"], 2))
    return {k: {"n": len(v), "median": sorted(v)[len(v) // 2], "max": max(v)} for k, v in out.items()}


def replacement_times(events: list[dict]) -> dict:
    """Per cell: seconds from each SIGKILL to the replacement's first record (process start) and to its
    admission (``joined``)."""
    out: dict[str, dict] = {}
    for f in (e for e in events if e.get("ev") == "fault" and e.get("kind") == "kill"):
        later = [e for e in events if e.get("slot") == f["slot"] and e["t"] > f["t"]]
        start = next((e["t"] - f["t"] for e in later if e.get("ev") == "start"), None)
        joined = next((e["t"] - f["t"] for e in later if e.get("ev") == "joined"), None)
        d = out.setdefault(str(f["cell"]), {"start": [], "joined": []})
        if start is not None:
            d["start"].append(round(start, 1))
        if joined is not None:
            d["joined"].append(round(joined, 1))
    return out


def run_campaign(opts: Options, baseline: bool = False) -> dict:
    """One campaign (after a fault-free run of the same seed and length when ``baseline``)."""
    base = None
    if baseline:
        from dataclasses import replace

        print(f"chaos: fault-free baseline first ({opts.duration:g}s, seed {opts.seed})", flush=True)
        bopts = replace(opts, log_dir=str(Path(opts.log_dir) / "baseline") if opts.log_dir else None)
        base = Campaign(bopts, faults=[]).run()
    report = Campaign(opts).run()
    if base is not None:
        kept = invariants.throughput_kept(report["rates"], base["rates"])
        report["baseline"] = {k: base[k] for k in ("rates", "collectives_completed", "peer_steps", "mismatches",
                                                     "hangs", "settle_seconds")}
        report["throughput_kept"] = {k: round(v, 3) for k, v in kept.items()}
        report["throughput_kept_min"] = round(min(kept.values()), 3) if kept else None
        if base["mismatches"] or base["hangs"]:
            report["violations"].append("the baseline run itself had mismatches or hangs")
            report["ok"] = False
    return report
