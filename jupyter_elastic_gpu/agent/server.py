"""The agent process: accepts sessions, starts one worker process per session, reports inventory.

The agent reads only a connection's first frame (a ``hello`` naming the session, or an
``inventory`` query); it then passes the socket to the session's worker, which serves the
data plane itself. Sessions whose client vanished are freed after a grace period.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import uuid

from ..lifecycle import exit_with_parent, exit_with_parent_requested
from ..protocol import messages as m
from ..protocol.fraction import GPUFraction
from ..protocol.frames import ProtocolError, recv_frame, send_frame, send_refusal, set_liveness
from ..protocol.tls import TLS_RECORD_HANDSHAKE, server_context
from .arena import HostArena
from .auth import HelloRejected, check_hello
from .inventory import gpu_inventory

GiB = 1 << 30

CPU_STAND_IN_GPUS = 8

log = logging.getLogger("jupyter_elastic_gpu.agent")


def mps_daemon_running() -> bool:
    """An NVIDIA MPS control daemon is up (its pipe exists): slices then get compute shares."""
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return os.path.exists(os.path.join(pipe, "control"))


def spare_warm_up(device: str, mps: bool, open_mode: bool, gpu_count: int) -> str | None:
    """What a spare worker readies on the GPU before its session exists (``--warm``).

    Creating a CUDA context costs a new session's first op a large share of a second;
    a spare can pay it while idle, but only where nothing that must precede the context is
    still unknown, and only on a GPU the session will surely use (a context costs the GPU it
    sits on hundreds of MiB for the worker's whole life):

    - ``None``: nothing (a CPU agent; or NVIDIA MPS: a fractional session's compute share
      must be in the environment before its context exists, and the MPS client may already
      attach to the server when the driver initialises);
    - ``"cuda"``: the driver and runtime only, no context (GPUs are placed per session);
    - ``"cuda:0"``: also a context and the first op's kernels on GPU 0, where every session
      is certain to run there: a node with one GPU, or open mode (no broker placement: a
      session's GPUs start at 0, see ``Agent._open_mode_gpus``).
    """
    if device != "cuda" or mps:
        return None
    if open_mode or gpu_count == 1:
        return "cuda:0"
    return "cuda"


class SessionWorker:
    """The agent's handle on one worker process: started as a spare (torch imported, no
    session yet), then bound to one session by ``assign``."""

    def __init__(self, agent):
        self.agent = agent
        self.session = self.secret = self.user = None
        self.gpus: list[int] = []
        self.attached = False
        self.fraction = 1.0
        self.connected = False
        self.fatal = False  # its CUDA context died: replaced on the next hello
        self.attaching = False
        self.stopping = False
        self.swapped = False
        self.swap_done = threading.Event()
        self.gone = False  # its control socket closed: the process is exiting, answers nothing
        self.in_use = 0
        self.cap = 0
        self.last_used = time.monotonic()
        self.disconnected_at = None
        self.ended = threading.Event()
        self.ready = False  # torch imported, waiting for its session
        self.ctl, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        if agent.lease_secret:
            env["ELASTIC_GPU_LEASE_SECRET"] = agent.lease_secret.decode()
        cmd = [
            sys.executable,
            "-m",
            "jupyter_elastic_gpu.agent.worker",
            "--control-fd",
            str(child.fileno()),
            "--agent-id",
            agent.agent_id,
            "--device",
            agent.device,
            "--cpu-memory-gib",
            str(agent.cpu_memory_gib),
            "--namespaces",
            ",".join(agent.namespaces),
        ]
        if agent.tls_files:
            cmd += ["--tls", ",".join(f or "" for f in agent.tls_files)]
        if agent.warm:
            cmd += ["--warm", agent.warm]
        fds = [child.fileno()]
        if agent.arena is not None:
            cmd += ["--arena", f"{agent.arena.fd},{agent.arena.size}"]
            fds.append(agent.arena.fd)
        self.extent = None  # the swap arena's extent holding this session while swapped out
        self.gpu_total = None  # the device's memory as its CUDA context sees it
        self.proc = subprocess.Popen(cmd, pass_fds=fds, env=env, start_new_session=True)
        child.close()
        threading.Thread(target=self._events, daemon=True, name=f"worker-{self.proc.pid}").start()

    def assign(self, session, secret, gpus, fraction=1.0, user=None) -> None:
        self.session, self.secret, self.gpus = session, secret, gpus
        self.fraction, self.user = fraction, user  # user: from the lease token, known early
        mps = None
        if self.agent.device == "cuda" and self.agent.mps and fraction < 1:
            # Under MPS a client's compute share is fixed when its context is created.
            mps = max(1, int(fraction * 100))
        self.send({"cmd": "assign", "session": session, "gpus": gpus, "mps_percentage": mps})

    def send(self, cmd: dict) -> None:
        try:
            self.ctl.send(json.dumps(cmd).encode())
        except OSError:
            pass

    def request_swap_out(self) -> None:
        """Ask the worker to swap out, into an extent of the agent's arena where one is free
        (it falls back to memory of its own when its tensors do not fit)."""
        arena = self.agent.arena
        if arena is not None and self.extent is None:
            # Storages are aligned inside the extent: room for that beside the bytes in use.
            self.extent = arena.take(self.in_use + (self.in_use >> 6) + (1 << 20))
        self.send({"cmd": "swap_out", "extent": self.extent})

    def give_back_extent(self) -> None:
        extent, self.extent = self.extent, None
        if extent is not None:
            self.agent.arena.give(extent)

    def _make_room_then_proceed(self, need: int) -> None:
        try:
            self.agent.make_room(self, need)
        finally:
            self.send({"cmd": "proceed"})

    def swap_out(self, timeout: float = 60.0) -> bool:
        self.swap_done.clear()
        if self.gone:
            # Exiting (its kernel closed the session) after it was picked: its last wake-up
            # may have come before the clear above, so waiting would take the whole timeout.
            return False
        self.request_swap_out()
        if not self.swap_done.wait(timeout):
            # The attach that asked for room has waited all this time: say who did not answer.
            log.warning(
                "session %s (worker pid %s, attached=%s, attaching=%s) did not answer a "
                "swap-out in %gs",
                self.session,
                self.proc.pid,
                self.attached,
                self.attaching,
                timeout,
            )
            return False
        return self.swapped and not self.ended.is_set()

    @property
    def alive(self) -> bool:
        return not (
            self.stopping or self.gone or self.ended.is_set() or self.proc.poll() is not None
        )

    def hand_over(self, conn: socket.socket, hello: dict, tls: bool = False, kind="conn") -> None:
        """Pass a client's connection to the worker: its data connection (``conn``) or one of
        its bulk streams (``bulk``)."""
        cmd = {"cmd": kind, "hello": hello, "tls": tls, "secret": self.secret}
        socket.send_fds(self.ctl, [json.dumps(cmd).encode()], [conn.fileno()])
        if kind == "conn":
            self.connected, self.disconnected_at = True, None

    def stop(self, reason: str) -> None:
        self.stopping = True
        try:
            self.ctl.send(json.dumps({"cmd": "stop", "reason": reason}).encode())
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def _events(self):
        while True:
            try:
                msg = self.ctl.recv(1 << 16)
            except OSError:
                msg = b""
            if not msg:
                break
            ev = json.loads(msg)
            kind = ev.get("event")
            self.in_use = ev.get("in_use", self.in_use)
            if kind == "ready":
                self.ready = True
            elif kind == "attaching":
                self.user, self.fraction = ev.get("user") or self.user, ev.get("fraction", 0)
                self.cap = ev.get("need", 0)
                self.gpu_total = ev.get("total")
                self.attaching = True
                threading.Thread(
                    target=self._make_room_then_proceed, args=(ev.get("need", 0),), daemon=True
                ).start()
            elif kind == "attached":
                self.attached, self.attaching = True, False
                self.last_used = time.monotonic()
            elif kind == "detached":
                self.attached = False
                self.last_used = time.monotonic()
                if self.agent.swap_policy == "always":
                    self.request_swap_out()
                elif self.agent.swap_policy == "ahead":
                    threading.Thread(
                        target=self.agent.make_room, args=(self, self.cap, True), daemon=True
                    ).start()
            elif kind == "swapped":
                self.swapped = bool(ev.get("ok")) or self.swapped
                if ev.get("ok"):
                    self._record_swap("out", ev)
                if not (ev.get("ok") and ev.get("arena")):
                    self.give_back_extent()  # not used: refused, or kept in its own memory
                self.swap_done.set()
            elif kind == "swapped_in":
                self.swapped = False
                self._record_swap("in", ev)
                self.give_back_extent()
            elif kind == "fatal":
                self.fatal = True
            elif kind == "disconnected":
                self.attached, self.connected = False, False
                self.disconnected_at = time.monotonic()
        self.give_back_extent()
        self.gone = True  # before the wake-up: swap_out() checks it after clearing
        self.swap_done.set()  # nobody waits on a worker that is gone
        code = self.proc.wait()
        if code not in (0, None):
            why = f"signal {-code}" if code < 0 else f"exit code {code}"
            log.warning("worker of session %s ended with %s", self.session, why)
        self.ended.set()
        self.agent.forget(self)

    def _record_swap(self, direction: str, ev: dict) -> None:
        self.agent.swap_stats.append(
            {"direction": direction, "bytes": ev["bytes"], "seconds": ev["seconds"]}
            | ({"arena": bool(ev.get("arena"))} if direction == "out" else {})
        )
        total = self.agent.swap_totals[direction]
        total["count"] += 1
        total["bytes"] += ev["bytes"]
        total["seconds"] += ev["seconds"]
        log.info(
            "session %s swapped %s: %.1f MiB in %.3fs",
            self.session,
            direction,
            ev["bytes"] / 2**20,
            ev["seconds"],
        )

    def describe(self) -> dict:
        return {
            "session": self.session,
            "user": self.user,
            "attached": self.attached,
            "fraction": self.fraction,
            "connected": self.connected,
            "pid": self.proc.pid,
            "gpus": self.gpus,
            "memory": self.in_use,
            "swapped": self.swapped,
        }


class Agent:
    def __init__(
        self,
        *,
        device="cpu",
        host="127.0.0.1",
        port=0,
        agent_id=None,
        lease_secret=None,
        namespaces=("aten", "prims", "torchvision"),
        cpu_memory_gib=16.0,
        session_grace=60.0,
        hello_timeout=10.0,
        swap_policy="pressure",
        tls_cert=None,
        tls_key=None,
        tls_client_ca=None,
        spare_workers=1,
        swap_arena_bytes=0,
    ):
        self.device = device
        # Workers load the same files: each terminates TLS for its own session's connection.
        self.tls_files = [tls_cert, tls_key, tls_client_ca] if tls_cert else None
        self.tls = server_context(tls_cert, tls_key, tls_client_ca) if tls_cert else None
        self.agent_id = agent_id or f"agent-{uuid.uuid4().hex[:8]}"
        self.lease_secret = lease_secret.encode() if isinstance(lease_secret, str) else lease_secret
        self.namespaces = list(namespaces)
        self.cpu_memory_gib = cpu_memory_gib
        self.session_grace = session_grace
        self.hello_timeout = hello_timeout
        self.swap_policy = swap_policy
        self.arena = HostArena(swap_arena_bytes) if swap_arena_bytes else None
        # Started workers kept ready, so a session's first op skips the worker's torch import.
        self.spare_workers = spare_workers
        self.spares: list[SessionWorker] = []
        self.mps = mps_daemon_running()
        self._gpu_totals: dict[int, int] | None = None  # see gpu_memory()
        self.warm = spare_warm_up(
            device, self.mps, open_mode=self.lease_secret is None, gpu_count=len(self.gpu_totals())
        )
        self.swap_stats: list[dict] = []
        # Since start, per direction: the recent list above is capped, benchmarks need totals.
        self.swap_totals = {d: {"count": 0, "bytes": 0, "seconds": 0.0} for d in ("out", "in")}
        self.workers: dict[str, SessionWorker] = {}
        self._handed: dict[int, bool] = {}
        self.lock = threading.Lock()
        agent = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                agent.on_connection(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

            def shutdown_request(self, request):
                # A socket handed to a worker must stay open there: close our copy only.
                if agent._handed.pop(id(request), None) is None:
                    super().shutdown_request(request)
                else:
                    request.close()

        self.server = Server((host, port), Handler)
        self.address = "{}:{}".format(*self.server.server_address[:2])
        self._stop = threading.Event()

    # -- connections -------------------------------------------------------------------------
    def on_connection(self, conn: socket.socket) -> None:
        conn.settimeout(self.hello_timeout)
        if self.tls is None:
            if self._first_request(conn):
                self._handed[id(conn)] = True
            return
        stream = self._start_tls(conn)  # takes over conn's descriptor
        if stream is not None:
            try:
                self._first_request(stream)
            finally:
                stream.close()  # after a hand-over the worker holds its own copy

    def _first_request(self, conn) -> bool:
        """Answer the connection's first request; True when it was handed to a worker."""
        try:
            header, _ = recv_frame(conn)
            msg = m.parse(header, tuple(self.FIRST_REQUESTS))
        except (ProtocolError, OSError, ConnectionError, ValueError) as e:
            send_refusal(conn, f"bad first frame: {e}")
            return False
        conn.settimeout(None)
        set_liveness(conn, 20.0)  # a vanished client is noticed even if it never sends FIN
        return self.FIRST_REQUESTS[type(msg)](self, conn, msg)

    def _inventory(self, conn, msg: m.Inventory) -> bool:
        send_frame(conn, self.inventory())
        return False

    def _hello(self, conn, hello: m.Hello) -> bool:
        worker = self._session_worker(conn, hello)
        if worker is None:
            return False
        return self._hand_over(conn, worker, hello)

    def _bulk_hello(self, conn, hello: m.BulkHello) -> bool:
        """A bulk stream (protocol/bulk.py) of a session that exists: the secret here, then in
        the worker the secret again (after its own TLS handshake), the lease token and the
        nonce of the connection the stream joins."""
        with self.lock:
            worker = self.workers.get(hello.session)
        if (
            worker is None
            or not worker.alive
            or not hmac.compare_digest(worker.secret.encode(), hello.secret.encode())
        ):
            send_refusal(conn, "no such session, or wrong secret")
            return False
        return self._hand_over(conn, worker, hello, kind="bulk")

    def _hand_over(self, conn, worker: SessionWorker, hello, kind="conn") -> bool:
        if self.tls is not None:
            # TLS state cannot cross processes: end this TLS layer; the worker starts its own.
            try:
                conn.settimeout(self.hello_timeout)
                send_frame(conn, m.HANDOVER_TLS)
                conn.unwrap()
            except (OSError, ValueError) as e:
                log.info("session %s: client left during the TLS hand-over: %s", worker.session, e)
                if kind == "conn" and not worker.connected and worker.disconnected_at is None:
                    worker.disconnected_at = time.monotonic()  # freed after the grace period
                return False
        try:
            worker.hand_over(conn, hello.header(), tls=self.tls is not None, kind=kind)
        except OSError:  # the worker died between lookup and hand-over
            self.forget(worker)
            send_refusal(conn, "this session's worker just ended; connect again")
            return False
        return True

    def _start_tls(self, conn):
        """TLS for a new connection; a plaintext client is told, in plaintext, what is wrong."""
        try:
            first = conn.recv(1, socket.MSG_PEEK)
            if not first:
                return None  # a port probe: connected and left
            if first[0] != TLS_RECORD_HANDSHAKE:
                send_refusal(
                    conn,
                    "this agent requires TLS on the data plane: set ELASTIC_GPU_TLS_DIR (a "
                    "directory made by `jupyter-elastic-gpu tls-certs`) or ELASTIC_GPU_TLS_CA to "
                    "the CA that signed the agent's certificate",
                )
                return None
            return self.tls.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log.info("TLS handshake failed: %s", e)
            return None

    def _session_worker(self, conn, hello: m.Hello) -> SessionWorker | None:
        """The worker of the session ``hello`` names, started if new; None after refusing."""
        session, secret = hello.session, hello.secret
        with self.lock:
            worker = self.workers.get(session)
        if worker is not None and (worker.fatal or worker.proc.poll() is not None):
            worker.ended.wait(10)  # a worker that died ends; its session starts afresh
            self.forget(worker)
        with self.lock:
            worker = self.workers.get(session)
            if worker is not None and not hmac.compare_digest(
                worker.secret.encode(), secret.encode()
            ):
                send_refusal(conn, "wrong secret for this session")
                return None
            if worker is None:
                try:
                    claims = check_hello(
                        hello.header(), self.lease_secret, self.agent_id, session, None
                    )
                except HelloRejected as e:
                    send_refusal(conn, str(e))
                    return None
                try:
                    fraction = GPUFraction(claims.get("fraction") or hello.fraction or 1.0)
                    gpus = claims.get("gpus") or self._open_mode_gpus(fraction)
                except ValueError as e:
                    send_refusal(conn, str(e))
                    return None
                worker = self.workers[session] = self._spare()
                worker.assign(session, secret, gpus, fraction, claims.get("user"))
                log.info(
                    "session %s started (user %s, gpus %s, pid %d)",
                    session,
                    claims.get("user"),
                    gpus,
                    worker.proc.pid,
                )
        return worker

    def _by_secret(self, conn, msg: m.Interrupt | m.Close) -> bool:
        """Interrupt or close a session beside its data connection (the worker may be busy, or
        its client dead): the session secret is the proof of ownership."""
        with self.lock:
            worker = self.workers.get(msg.session)
        secret = msg.secret
        if (
            worker is None
            or not isinstance(secret, str)
            or not hmac.compare_digest(worker.secret.encode(), secret.encode())
        ):
            send_refusal(conn, "no such session, or wrong secret")
            return False
        if type(msg) is m.Interrupt:
            worker.send({"cmd": "interrupt", "epoch": msg.epoch})
        else:
            worker.stop("closed by its owner")
        send_frame(conn, {"ok": True})
        return False

    # What a connection's first frame may ask; every other request goes to a session's worker.
    FIRST_REQUESTS = {
        m.Hello: _hello,
        m.Inventory: _inventory,
        m.Interrupt: _by_secret,
        m.Close: _by_secret,
        m.BulkHello: _bulk_hello,
    }

    def gpu_totals(self) -> dict[int, int]:
        """Each GPU's total memory by index, asked of NVML once: a session's start and every
        attach need it, and an NVML query (its init on every GPU of the node) would sit in
        that path each time, for figures that cannot change while the agent runs."""
        if not self._gpu_totals:  # none found (NVML failed) is asked again, not kept
            inv = gpu_inventory(self.device, self.cpu_memory_gib)
            self._gpu_totals = {g["index"]: g["memory_total"] for g in inv}
        return self._gpu_totals

    def gpu_memory(self, gpu: int) -> int:
        return self.gpu_totals().get(gpu, 0)

    def make_room(self, worker: SessionWorker, need: int, ahead: bool = False) -> None:
        """Swap idle sessions on ``worker``'s GPUs out, least recently used first, until ``need``
        bytes fit beside the memory of the sessions that stay.

        ``ahead``: ``worker`` has just detached, and room for a slice like the one it held is
        made now, while nobody waits, rather than in the next attach's hello (it may be
        swapped itself, last, being the most recently used)."""
        if self.swap_policy == "never":
            return
        gpu = worker.gpus[0]
        # The slice's cap is a share of what CUDA reports (less than NVML's total by the
        # driver's reserve): measured against NVML's, a whole-GPU slice would seem to fit
        # beside idle sessions that in fact leave it short.
        total = min(self.gpu_memory(gpu), worker.gpu_total or float("inf"))
        while True:
            with self.lock:
                same = [
                    w
                    for w in self.workers.values()
                    if (ahead or w is not worker) and gpu in w.gpus
                ]
            # Attached sessions are entitled to their whole slice; idle ones hold what they use.
            resident = sum(
                w.cap if (w.attached or w.attaching) else 0 if w.swapped else w.in_use for w in same
            )
            if resident + need <= total:
                return
            idle = sorted(
                (w for w in same if w.alive and not (w.attached or w.attaching or w.swapped)),
                key=lambda w: w.last_used,
            )
            if not idle:
                return  # nothing left to swap: the allocator's cap will say OOM if it comes to it
            if not idle[0].swap_out():
                return

    def _spare(self) -> SessionWorker:
        """A started worker for a new session (called under ``self.lock``): a spare, whose
        torch import is already done, if one is ready; another spare starts meanwhile."""
        while self.spares:
            w = self.spares.pop(0)
            if w.alive:
                break
        else:
            w = SessionWorker(self)
        if self.spare_workers and not self._stop.is_set():
            threading.Thread(target=self._refill_spares, daemon=True).start()
        return w

    def _refill_spares(self) -> None:
        with self.lock:
            while len(self.spares) < self.spare_workers and not self._stop.is_set():
                self.spares.append(SessionWorker(self))

    def forget(self, worker: SessionWorker) -> None:
        with self.lock:
            if self.workers.get(worker.session) is worker:
                del self.workers[worker.session]
            if worker in self.spares:  # a spare died (OOM killer, kill): start another,
                self.spares.remove(worker)  # unless it never came up (no crash loop)
                if worker.ready and not self._stop.is_set():
                    threading.Thread(target=self._refill_spares, daemon=True).start()
                elif not worker.ready:
                    log.warning("a spare worker failed to start; workers now start on demand")

    def _open_mode_gpus(self, fraction: GPUFraction) -> list[int]:
        # No broker placement: a lease above 1 takes the first GPUs, if there are that many.
        # A CPU agent stands in for as many GPUs as one host has, for multi-GPU code in CI.
        have = len(self.gpu_totals()) if self.device == "cuda" else CPU_STAND_IN_GPUS
        if fraction.gpus > have:
            raise ValueError(
                f"a fraction of {fraction:g} needs {fraction.gpus} GPUs; this agent has {have}"
            )
        return list(range(fraction.gpus))

    def inventory(self) -> dict:
        with self.lock:
            sessions = [w.describe() for w in self.workers.values()]
            spares = [{"pid": w.proc.pid, "ready": w.ready, "warm": self.warm} for w in self.spares]
        return {
            "agent": {
                "id": self.agent_id,
                "address": self.address,
                "device": self.device,
                "mps": self.mps,
                "swap_policy": self.swap_policy,
                "swaps": self.swap_stats[-20:],
                "swap_totals": self.swap_totals,
                "swap_arena": {"bytes": self.arena.size, "free": self.arena.free_bytes}
                if self.arena is not None
                else None,
                "spare_workers": spares,
            },
            "gpus": gpu_inventory(self.device, self.cpu_memory_gib),
            "sessions": sessions,
        }

    # -- lifecycle -------------------------------------------------------------------------------
    def _reap_vanished(self):
        while not self._stop.wait(min(1.0, self.session_grace / 2 or 0.1)):
            now = time.monotonic()
            with self.lock:
                gone = [
                    w
                    for w in self.workers.values()
                    if w.disconnected_at is not None
                    and now - w.disconnected_at > self.session_grace
                ]
            for w in gone:
                log.info(
                    "session %s: client gone for %.0fs, freeing it", w.session, self.session_grace
                )
                w.stop("client vanished")

    def serve_forever(self) -> None:
        threading.Thread(target=self._reap_vanished, daemon=True).start()
        threading.Thread(target=self._refill_spares, daemon=True).start()
        self.server.serve_forever(poll_interval=0.2)

    def shutdown(self, reason="the GPU agent is shutting down") -> None:
        """Stop accepting, tell every attached client why, and end all workers."""
        if not self._stop.is_set():
            self._stop.set()
            self.server.shutdown()
        with self.lock:
            workers = list(self.workers.values()) + self.spares
            self.spares = []
        # in parallel: a worker busy in a long op takes its 5 s before it is killed
        stopping = [threading.Thread(target=w.stop, args=(reason,)) for w in workers]
        for t in stopping:
            t.start()
        for t in stopping:
            t.join()
        self.server.server_close()


def swap_arena_bytes(gib: float | None, device: str, policy: str) -> int:
    """The swap arena's size: as asked, else on a GPU node 1/8 of host memory up to 16 GiB
    (pinned memory is taken from the host for good), none on a CPU agent or with no swaps."""
    if gib is not None:
        return int(gib * GiB)
    if device != "cuda" or policy == "never":
        return 0
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0
    return min(16 * GiB, host // 8)


def run_agent(opts) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s %(asctime)s agent] %(message)s")
    device = opts.device
    if device == "auto":
        device = "cuda" if gpu_inventory("cuda", 0) else "cpu"
    host, _, port = opts.listen.rpartition(":")
    secret = opts.lease_secret or os.environ.get("ELASTIC_GPU_LEASE_SECRET")
    if opts.lease_secret_file:
        with open(opts.lease_secret_file) as f:
            secret = f.read().strip()
    if opts.tls_cert:
        try:
            server_context(opts.tls_cert, opts.tls_key, opts.tls_client_ca)
        except (OSError, ssl.SSLError) as e:
            files = [f for f in (opts.tls_cert, opts.tls_key, opts.tls_client_ca) if f]
            log.error("cannot use the TLS files %s: %s", ", ".join(files), e)
            sys.exit(2)
    agent = Agent(
        device=device,
        host=host.strip("[]") or "127.0.0.1",
        port=int(port),
        agent_id=opts.agent_id,
        lease_secret=secret or None,
        cpu_memory_gib=opts.cpu_memory_gib,
        session_grace=opts.session_grace,
        swap_policy=opts.swap_policy,
        namespaces=["aten", "prims", "torchvision", *filter(None, opts.allow_namespace or [])],
        tls_cert=opts.tls_cert,
        tls_key=opts.tls_key,
        tls_client_ca=opts.tls_client_ca,
        spare_workers=opts.spare_workers,
        swap_arena_bytes=swap_arena_bytes(opts.swap_arena_gib, device, opts.swap_policy),
    )
    gpus = gpu_inventory(device, opts.cpu_memory_gib)
    if not gpus:
        log.error(
            "--device cuda, but no GPU is visible (NVML found none): use --device cpu or auto"
        )
        sys.exit(2)
    log.info(
        "agent %s listening on %s, device=%s (%s)%s",
        agent.agent_id,
        agent.address,
        device,
        ", ".join(g["name"] for g in gpus),
        "; NVIDIA MPS daemon found: slices get compute shares"
        if agent.mps and device == "cuda"
        else "",
    )
    if opts.tls_cert:
        log.info(
            "data plane: TLS%s",
            " with client certificates required" if opts.tls_client_ca else "",
        )
    if not secret:
        log.warning(
            "no lease secret: any client that can reach %s may use this agent "
            "(fine on loopback or for a single user; set --lease-secret-file with a broker)",
            agent.address,
        )
    registration = None
    if opts.broker_url:
        from .registration import BrokerRegistration

        registration = BrokerRegistration(
            agent,
            opts.broker_url,
            opts.agent_token or os.environ.get("ELASTIC_GPU_AGENT_TOKEN", ""),
            advertise=opts.advertise or agent.address,
        )
        registration.start()

    def on_term(signum, frame):
        log.info("%s: telling clients and stopping", signal.Signals(signum).name)
        if registration:
            registration.halt()
        # serve_forever returns once the server has stopped; workers are ended below.
        threading.Thread(target=agent.server.shutdown, daemon=True).start()

    # SIGINT too, explicitly: a process started from a background job inherits SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler (the Hub's Ctrl-C
    # reaches its services as SIGINT).
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    if exit_with_parent_requested():
        exit_with_parent("agent")
    try:
        agent.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        agent._stop.set()
        agent.shutdown()
        if registration:
            registration.stop()
    log.info("stopped")
    # Workers are gone and clients told: skip the interpreter's teardown, which with torch
    # loaded takes over a second and would hold up every Hub stop (services stop in turn).
    # Only after a clean stop: an error above still ends with its traceback and exit status.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
