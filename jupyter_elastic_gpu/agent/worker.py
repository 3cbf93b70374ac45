"""One session's worker process: owns its tensors, its CUDA context and its client socket.

The agent hands the client's connection to this process (SCM_RIGHTS), so ops flow from
client to worker with no hop through the agent, and a crash or sticky CUDA error here ends
only this session. The agent talks to the worker over a control socket (assign, connection
hand-over, swap, interrupt, stop). Workers start before their session exists, as the agent's
spares, and with TLS each terminates its own session's TLS (see protocol/tls.py).
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import secrets
import select
import selectors
import signal
import socket
import sys
import time

import torch

from ..lifecycle import exit_with_parent
from ..protocol import bulk
from ..protocol import messages as m
from ..protocol.bulk import BulkStreams
from ..protocol.fraction import GPUFraction
from ..protocol.frames import FrameReader, ProtocolError, recv_frame, send_frame, send_refusal
from ..protocol.tls import GO_AHEAD, server_context
from ..protocol.values import as_buffer, host_buffer, tensor_from_buffer
from . import graphs
from .arena import WorkerArena
from .auth import HelloRejected, check_hello
from .executor import OpResolver, SessionExecutor, error_payload

GiB = 1 << 30
# After a frame, the next one (the rest of a training step, the next sync) usually follows
# within microseconds: poll for it this long before sleeping in the kernel, whose wake-up
# costs more than the round trip. Off on small machines, where the poller would take the
# client's core. ELASTIC_GPU_SPIN_US overrides it (0: never poll).
SPIN_SECONDS = float(
    os.environ.get("ELASTIC_GPU_SPIN_US", 1000 if (os.cpu_count() or 1) >= 4 else 0)
) / 1e6

POLL_SECONDS = 0.001  # how often a running batch looks for an interrupt


class Worker:
    def __init__(self, opts):
        self.opts = opts
        self.device_kind = opts.device
        if self.device_kind == "cpu":
            from . import cpu_kernels

            cpu_kernels.register()
        from . import attention

        attention.register(self.device_kind)
        graphs.configure(self.device_kind)
        self.session = None
        self.devices: list[torch.device] = []
        self.executor: SessionExecutor | None = None
        self.tls = None  # the server context, loaded at the first TLS connection
        self.lease_secret = os.environ.pop("ELASTIC_GPU_LEASE_SECRET", "").encode() or None
        self.user = None
        self.expires = None  # unix time the lease token runs out (None in open mode)
        self.attached = False
        self.fraction = 0.0
        self.cap_bytes = 0
        self.client: socket.socket | None = None
        self.reader: FrameReader | None = None
        # The client connection's bulk streams (protocol/bulk.py), and the nonce a bulk hello
        # must name to join this connection (a new connection gets a new one).
        self.bulk: BulkStreams | None = None
        self.bulk_conn: str | None = None
        self.arena = WorkerArena(*opts.arena) if opts.arena else None
        self.fatal = False
        self.cancel_epoch = 0  # batches of an older epoch than this were interrupted
        self.batch_epoch = 0
        self._next_poll = 0.0
        self.swapped = False
        self.last_swap_in = None
        self.ctl = socket.socket(fileno=opts.control_fd)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.ctl, selectors.EVENT_READ, "ctl")

    def wait_for_assignment(self) -> None:
        """Workers start before their session exists (the agent keeps spares with torch
        already imported); the agent then binds one to a session and its GPUs."""
        cmd = self.wait_for("assign", timeout=None)
        if cmd.get("mps_percentage"):
            # Read when the CUDA context is created, which has not happened yet.
            os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(cmd["mps_percentage"])
        self.session = cmd["session"]
        gpus = cmd.get("gpus") or [0]
        if self.device_kind == "cuda":
            self.devices = [torch.device("cuda", g) for g in gpus]
            # Events, synchronize() and pinned allocations use the current device: without
            # this, a worker given GPU 2 would make a context on GPU 0 for them.
            torch.cuda.set_device(self.devices[0])
        else:
            self.devices = [torch.device("cpu")] * max(1, len(gpus))
        self.executor = SessionExecutor(self.devices, OpResolver(self.opts.namespaces.split(",")))
        self.executor.graphs = graphs.SessionGraphs(self.executor)

    def warm_up(self, target: str) -> None:
        """Ready the GPU while this spare waits for a session (``target`` is the agent's
        ``spare_warm_up()``): CUDA's initialisation, and on ``cuda:N`` a context with the
        kernels a first op loads, would otherwise be the first op's to pay. Only what a
        session would create anyway is made, and the allocator is left as a session finds
        it (nothing cached, peak statistics cleared); the slice's memory cap can be set on
        an existing context."""
        if select.select([self.ctl], [], [], 0)[0]:
            return  # started on demand: its session is already waiting, warm-up would delay it
        try:
            torch.cuda.init()
            if target.startswith("cuda:"):
                d = torch.device(target)
                torch.cuda.get_device_properties(d)  # cached by torch for device_info()
                torch.ones(1, device=d).sum().item()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(d)
                torch.cuda.reset_accumulated_memory_stats(d)
                if self.arena is not None:  # the context exists now: pinning adds none
                    t0 = time.perf_counter()
                    self.arena.pin()
                    print(
                        f"elastic-gpu worker {os.getpid()}: swap arena of "
                        f"{self.arena.tensor.numel() / GiB:.1f} GiB pinned in "
                        f"{time.perf_counter() - t0:.2f}s",
                        file=sys.stderr,
                        flush=True,
                    )
        except Exception as e:  # the session's own set-up meets it again and reports it
            print(f"elastic-gpu worker: GPU warm-up failed: {e}", file=sys.stderr, flush=True)

    # -- device description ---------------------------------------------------------------
    def device_info(self) -> dict:
        n = len(self.devices)
        if self.device_kind == "cuda":
            p = torch.cuda.get_device_properties(self.devices[0])
            total = p.total_memory
            info = {
                "name": p.name,
                "major": p.major,
                "minor": p.minor,
                "multi_processor_count": p.multi_processor_count,
            }
        else:
            total = int(self.opts.cpu_memory_gib * GiB)
            info = {
                "name": "CPU (elastic-gpu agent in --device cpu mode)",
                "major": 8,
                "minor": 0,
                "multi_processor_count": os.cpu_count() or 1,
            }
        return {
            **info,
            "kind": self.device_kind,
            "count": n,
            "total_memory": total,
            "fraction": self.fraction,
            "cap_bytes": int(total * GPUFraction(self.fraction).per_gpu),
        }

    def _apply_cap(self):
        info = self.device_info()
        self.cap_bytes = info["cap_bytes"]
        if self.device_kind == "cuda":
            for d in self.devices:
                share = GPUFraction(self.fraction).per_gpu
                torch.cuda.set_per_process_memory_fraction(max(share, 0.01), d)
        self.executor.cap_bytes = self.cap_bytes if self.device_kind == "cpu" else None
        self.executor.slice_cap = self.cap_bytes
        self.executor.slice_name = f"{self.fraction:g} of {info['name']}"

    # -- control from the agent ---------------------------------------------------------
    def on_control(self):
        # select() may have reported a message that a batch's interrupt poll has since read
        # (both sockets ready at once, the client's handled first): a blocking read here would
        # then hang the session until the agent's next command.
        if not select.select([self.ctl], [], [], 0)[0]:
            return
        msg, fds, _flags, _addr = socket.recv_fds(self.ctl, 1 << 20, 4)
        if not msg:
            self.shutdown("the agent process went away")
        cmd = json.loads(msg)
        if cmd["cmd"] == "bulk":
            self.on_bulk_stream(socket.socket(fileno=fds[0]), cmd)
        elif cmd["cmd"] == "conn":
            conn = socket.socket(fileno=fds[0])
            conn.setblocking(True)
            hello = cmd["hello"]
            try:  # a refused newcomer must not cost the owner its connection
                if cmd.get("tls"):
                    conn = self.tls_leg(conn)
                    hello, _ = recv_frame(conn)
                    conn.settimeout(None)
                    if not _same_secret(hello, cmd["secret"], "hello"):
                        raise HelloRejected("wrong secret for this session")
                check_hello(hello, self.lease_secret, self.opts.agent_id, self.session, self.user)
            except (HelloRejected, OSError, ProtocolError, ValueError) as e:
                if isinstance(e, HelloRejected):
                    send_refusal(conn, str(e))
                conn.close()  # not our client (or it left mid-handshake)
                if self.client is None:  # nobody is connected: the agent's grace clock runs
                    self.notify(event="disconnected")
                return
            if self.client is not None:
                self.sel.unregister(self.client)
                self.client.close()
            self.close_bulk()
            self.client = conn
            # Signatures belong to a connection; the client sends its own again on this one.
            self.executor.reset_signatures()
            self.reader = FrameReader(conn, self.receive_buffer)
            self.bulk, self.bulk_conn = BulkStreams("bulk"), secrets.token_urlsafe(12)
            self.sel.register(self.client, selectors.EVENT_READ, "client")
            self.on_hello(hello)
        elif cmd["cmd"] == "stop":
            self.shutdown(cmd.get("reason", "the agent is shutting down"))
        elif cmd["cmd"] == "swap_out":
            self.swap_out(cmd.get("extent"))
        elif cmd["cmd"] == "interrupt":
            # Work queued before the interrupt (an older epoch) is dropped; newer work is not,
            # so an interrupt that finds the worker idle cannot poison the next cell.
            epoch = cmd.get("epoch")
            self.cancel_epoch = max(self.cancel_epoch, epoch if type(epoch) is int else 0)

    def on_bulk_stream(self, conn: socket.socket, cmd: dict) -> None:
        """A bulk stream for the current client connection: checked as a hello is (the secret
        again after our own TLS leg, the lease token), and it must name this connection's
        nonce. A refusal closes only the newcomer."""
        conn.setblocking(True)
        hello = cmd["hello"]
        try:
            if cmd.get("tls"):
                conn = self.tls_leg(conn)
                hello, _ = recv_frame(conn)
                conn.settimeout(None)
            msg = m.parse(hello, (m.BulkHello,))
            if not _same_secret(hello, cmd["secret"], m.Op.BULK_HELLO.value):
                raise HelloRejected("wrong secret for this session")
            check_hello(hello, self.lease_secret, self.opts.agent_id, self.session, self.user)
            if (
                self.client is None
                or self.bulk is None
                or not hmac.compare_digest(msg.conn.encode(), self.bulk_conn.encode())
            ):
                raise HelloRejected("this bulk stream names no live connection of the session")
            send_frame(conn, {"ok": True, "index": msg.index})
        except (HelloRejected, OSError, ProtocolError, ValueError) as e:
            if isinstance(e, (HelloRejected, ProtocolError)):
                send_refusal(conn, str(e))
            conn.close()
            return
        self.bulk.add(msg.index, conn)

    def close_bulk(self) -> None:
        if self.bulk is not None:
            self.bulk.close()
        self.bulk = self.bulk_conn = None

    def tls_leg(self, conn):
        """Second leg of a TLS session connection (see protocol/tls.py): the go-ahead byte, then
        our own handshake. The client repeats its hello inside, and the secret in it proves it
        is still the client the agent checked."""
        if self.tls is None:
            self.tls = server_context(*self.opts.tls.split(","))
        conn.settimeout(10.0)
        conn.sendall(GO_AHEAD)
        return self.tls.wrap_socket(conn, server_side=True)

    def interrupted(self) -> bool:
        """Poll the control socket without blocking: was the batch running now interrupted?

        At most once per ``POLL_SECONDS``: a ``select`` costs more than a small op's dispatch,
        and a millisecond more is nothing against the second an interrupt may take."""
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + POLL_SECONDS
            while select.select([self.ctl], [], [], 0)[0]:
                self.on_control()
        return self.batch_epoch < self.cancel_epoch

    def swap_out(self, extent=None):
        """Move this idle session's tensors to host memory (the extent of the agent's swap
        arena it was given, else fresh pinned memory) and free its GPU memory."""
        if self.attached or self.swapped:
            self.notify(event="swapped", ok=False, in_use=self.executor.in_use)
            return
        t0 = time.perf_counter()
        host = None
        if extent is not None and self.arena is not None:
            try:
                if self.device_kind == "cuda":
                    self.arena.pin()  # at the first swap-out, unless the warm-up did it
                host = self.arena.extent(*extent)
            except (RuntimeError, ValueError, TypeError) as e:
                print(f"elastic-gpu worker: swap arena unusable ({e})", file=sys.stderr)
        nbytes = self.executor.swap_out(pin=self.device_kind == "cuda", extent=host)
        if self.device_kind == "cuda":
            torch.cuda.empty_cache()
        self.swapped = True
        self.notify(
            event="swapped",
            ok=True,
            bytes=nbytes,
            seconds=time.perf_counter() - t0,
            in_use=0,
            arena=host is not None,
        )

    def swap_in(self):
        t0 = time.perf_counter()
        nbytes = self.executor.swap_in()
        self.swapped = False
        self.last_swap_in = {"bytes": nbytes, "seconds": time.perf_counter() - t0}
        self.notify(event="swapped_in", **self.last_swap_in)

    def notify(self, **event):
        try:
            self.ctl.send(json.dumps(event).encode())
        except OSError:
            pass

    def on_hello(self, hello):
        try:
            claims = check_hello(
                hello, self.lease_secret, self.opts.agent_id, self.session, self.user
            )
        except HelloRejected as e:
            self.reply(m.error_reply("PermissionError", str(e)))
            return
        self.user = claims.get("user", self.user)
        self.expires = claims.get("exp")
        try:
            self.fraction = GPUFraction(claims.get("fraction") or hello.get("fraction") or 1.0)
        except ValueError as e:
            self.reply(m.error_reply("ValueError", str(e)))
            return
        self._apply_cap()
        # The agent may swap idle sessions out to make room for this one first.
        self.notify(
            event="attaching",
            user=self.user,
            fraction=self.fraction,
            need=self.cap_bytes,
            total=self.device_info()["total_memory"],
        )
        self.wait_for("proceed")
        if self.swapped:
            self.swap_in()
        self.attached = True
        self.notify(
            event="attached", user=self.user, fraction=self.fraction, in_use=self.executor.in_use
        )
        # "signatures": this agent reads SigDef/SigUse records (an older one takes only Runs).
        self.reply(
            {
                "ok": True,
                "device": self.device_info(),
                "swap_in": self.last_swap_in,
                "signatures": True,
                # Bulk streams may join this connection (protocol/bulk.py) naming this nonce.
                "bulk_offer": {"conn": self.bulk_conn, "max": m.MAX_BULK_STREAMS},
            }
        )

    def wait_for(self, what: str, timeout: float | None = 120.0):
        """Block on the control socket until the agent sends ``what`` (other commands run meanwhile)."""
        self.ctl.settimeout(timeout)
        try:
            while True:
                msg = self.ctl.recv(1 << 16)
                if not msg:
                    self.shutdown("the agent process went away")
                cmd = json.loads(msg)
                if cmd["cmd"] == what:
                    return cmd
                if cmd["cmd"] == "swap_out":  # we are attaching: not idle, never swapped now
                    self.notify(event="swapped", ok=False)
                if cmd["cmd"] == "stop":
                    self.shutdown(cmd.get("reason", "the agent is shutting down"))
        except TimeoutError:
            return None  # the agent did not answer: go on rather than hang the client
        finally:
            self.ctl.settimeout(None)

    # -- requests from the client --------------------------------------------------------
    def reply(self, header, bufs=()):
        try:
            send_frame(self.client, header, bufs)
        except OSError:
            self.drop_client()

    def receive_buffer(self, nbytes: int):
        # Uploads land in pinned memory on a CUDA worker, so their copy to the GPU can run
        # asynchronously (see SessionExecutor.run); the caching host allocator reuses it.
        return host_buffer(nbytes, pin=self.device_kind == "cuda")

    def drop_client(self):
        if self.client is not None:
            self.sel.unregister(self.client)
            self.client.close()
            self.client = self.reader = None
        self.close_bulk()
        self.attached = False
        self.notify(event="disconnected")

    def on_client(self):
        try:
            header, bufs = self.reader.recv()
            # Payloads that come over the bulk streams: whole, or hang up.
            bulk.complete(self.bulk, header, bufs, self.receive_buffer)
        except ProtocolError as e:
            # The stream cannot be trusted after a bad frame: say why, then hang up.
            self.reply(m.error_reply("ProtocolError", str(e)))
            self.drop_client()
            return
        except (OSError, ConnectionError):
            self.drop_client()
            return
        msg = None
        try:
            msg = m.parse(header, tuple(self.HANDLERS))
            self.handle(msg, bufs)
        except Exception as e:  # a bad request never ends the session
            op = header.get("op")
            if msg.NO_REPLY if msg is not None else type(op) is str and op in _NO_REPLY:
                # No reply is due: report it at the next sync point.
                if self.executor.error is None:
                    self.executor.error = error_payload(e, deferred=True)
            else:
                self.reply({"error": self.check_fatal(error_payload(e))})
        if self.fatal:
            self.notify(event="fatal")
            sys.exit(3)

    def handle(self, msg: m.Message, bufs) -> None:
        kind = type(msg)
        if kind is m.Batch and msg.sigs:
            # The table is the connection's, not the lease's: a batch refused below (its lease
            # ran out) still defines its signatures, as the client counts them sent. Defining
            # resolves names and decodes constants; nothing runs.
            self.executor.define_signatures(msg.sigs)
        if kind not in self.NEED_NO_LEASE:
            self.check_lease()
            if self.executor.error is not None and kind not in self.REPORT_LATER:
                # A sync point: the first queued op that failed is the error to report.
                return self.reply({"error": self.executor.take_error()})
        reply = self.HANDLERS[kind](self, msg, bufs)
        if reply is not None:
            self.reply(*reply)

    def check_lease(self) -> None:
        if self.attached and self.expires is not None and time.time() > self.expires:
            self.attached = False
            self.notify(event="detached", in_use=self.executor.in_use)
            raise PermissionError(
                "the GPU lease of this session expired (its heartbeats stopped); "
                "the next GPU op takes a new one"
            )
        if not self.attached:
            raise PermissionError("this session holds no GPU lease; attach first")

    # Each handler returns the reply (header, buffers), or None where none is due.
    def _hello(self, msg: m.Hello, bufs):
        self.on_hello(msg.header())

    def _close(self, msg: m.Close, bufs):
        self.shutdown("closed by client", code=0)

    def _renew(self, msg: m.Renew, bufs):
        hello = {"session": self.session, "token": msg.token}
        try:
            claims = check_hello(
                hello, self.lease_secret, self.opts.agent_id, self.session, self.user
            )
        except HelloRejected as e:
            raise PermissionError(str(e)) from None
        self.expires = claims.get("exp")

    def _batch(self, msg: m.Batch, bufs):
        self.batch_epoch = msg.epoch
        self.executor.run_batch(msg.ops, bufs, msg.free, self.interrupted)

    def _detach(self, msg, bufs):
        self.sync()
        self.attached = False
        self.notify(event="detached", in_use=self.executor.in_use)
        return (self.status(),)

    def _sync(self, msg, bufs):
        self.sync()
        return (self.status(),)

    def _fetch(self, msg: m.Fetch, bufs):
        self.sync()
        if msg.item:
            t = self.executor.tensor(msg.t)
            if t.numel() == 1 and not t.is_complex():
                return (self.status(value=t.item()),)
        meta, raw = self.executor.fetch(msg.t)
        header, bufs = self.status(tensor=meta), [raw]
        if msg.streams and self.bulk is not None and raw.nbytes:
            # The client asked for the bytes over (up to) this many of its bulk streams.
            ann, transfers = self.bulk.outgoing(bufs, 1, msg.streams)
            if ann:
                header["bulk"] = ann
                self.reply(header, bufs)
                if self.client is not None:
                    try:
                        self.bulk.send(transfers)
                    except (OSError, ProtocolError):
                        self.drop_client()
                return None
        return header, bufs

    def _call(self, msg: m.Call, bufs):
        result = self.executor.call(msg.name, msg.args, msg.kwargs, bufs)
        self.sync()
        return (self.status(result=result),)

    def _memory(self, msg, bufs):
        self.sync()
        return (self.status(memory=self.memory()),)

    def _manual_seed(self, msg: m.ManualSeed, bufs):
        torch.manual_seed(msg.seed)
        return (self.status(),)

    def _device_index(self, idx: int) -> int:
        if not 0 <= idx < len(self.devices):
            raise ValueError(f"no device {idx!r} in this session")
        return idx

    def _get_rng_state(self, msg: m.GetRngState, bufs):
        d = self.devices[self._device_index(msg.device)]
        self.sync()
        state = torch.cuda.get_rng_state(d) if self.device_kind == "cuda" else torch.get_rng_state()
        return self.status(), [as_buffer(state)]

    def _set_rng_state(self, msg: m.SetRngState, bufs):
        d = self.devices[self._device_index(msg.device)]
        if len(bufs) != 1:
            raise ProtocolError("set_rng_state takes one buffer")
        self.sync()
        state = tensor_from_buffer({"dtype": "uint8", "shape": [len(bufs[0])]}, bufs[0])
        if self.device_kind == "cuda":
            torch.cuda.set_rng_state(state, d)
        else:
            torch.set_rng_state(state)
        return (self.status(),)

    def _empty_cache(self, msg, bufs):
        if self.device_kind == "cuda":
            torch.cuda.empty_cache()
            torch._C._host_emptyCache()  # the pinned blocks of uploads and fetches, too
        return (self.status(),)

    def _compile_graph(self, msg: m.CompileGraph, bufs):
        """A graph to compile (agent/graphs.py): its handle, or why it was refused."""
        self.sync()
        info = self.executor.graphs.compile(msg.graph, msg.mode, self.device_kind)
        return (self.status(graph=info),)

    HANDLERS = {
        m.Hello: _hello,
        m.Close: _close,
        m.Renew: _renew,
        m.Batch: _batch,
        m.Detach: _detach,
        m.Sync: _sync,
        m.Fetch: _fetch,
        m.Call: _call,
        m.Memory: _memory,
        m.ManualSeed: _manual_seed,
        m.GetRngState: _get_rng_state,
        m.SetRngState: _set_rng_state,
        m.EmptyCache: _empty_cache,
        m.CompileGraph: _compile_graph,
    }
    # Served with or without a live lease (a renew brings the lease back to life).
    NEED_NO_LEASE = frozenset({m.Hello, m.Close, m.Renew})
    # Queued work, and detaching, do not turn a pending async error into their reply.
    REPORT_LATER = frozenset({m.Batch, m.Detach})

    def status(self, **kw):
        err = self.executor.take_error()
        return {"error": self.check_fatal(err), **kw} if err else {"ok": True, **kw}

    def check_fatal(self, err: dict) -> dict:
        """A sticky CUDA error (device-side assert, illegal address) kills this process's
        context: say so, and end the worker so the next attach starts a clean session."""
        if self.device_kind != "cuda" or "CUDA error" not in (err.get("message") or ""):
            return err
        try:
            torch.cuda.synchronize(self.devices[0])
            torch.ones(1, device=self.devices[0]).sum().item()
            return err
        except Exception:
            pass
        self.fatal = True
        return {
            **err,
            "fatal": True,
            "message": err["message"].split("\n")[0]
            + (
                " — this session's GPU context is lost (a sticky CUDA error) and its tensors are gone; "
                "the next GPU op starts a fresh session"
            ),
        }

    def sync(self):
        if self.device_kind == "cuda":
            try:
                for d in self.devices:
                    torch.cuda.synchronize(d)
            except Exception as e:  # a sticky CUDA error: this session's context is gone
                if self.executor.error is None:
                    self.executor.error = error_payload(e, deferred=True)

    def memory(self) -> dict:
        if self.device_kind == "cuda":
            d = self.devices[0]
            return {
                "allocated": torch.cuda.memory_allocated(d),
                "reserved": torch.cuda.memory_reserved(d),
                "max_allocated": torch.cuda.max_memory_allocated(d),
                "cap": self.cap_bytes,
            }
        used = self.executor.in_use
        return {
            "allocated": used,
            "reserved": used,
            "max_allocated": self.executor.peak,
            "cap": self.cap_bytes,
        }

    def shutdown(self, reason, code=0):
        if self.client is not None:
            try:
                send_frame(self.client, m.error_reply("ConnectionAbortedError", reason))
            except OSError:
                pass
        # Nothing of a session outlives its worker, so skip the interpreter's teardown: with
        # torch (and a CUDA context) loaded it adds a second or more to every agent stop.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def wait(self):
        events = self.sel.select(0)
        if not events and SPIN_SECONDS and self.client is not None:
            deadline = time.perf_counter() + SPIN_SECONDS
            while not events and time.perf_counter() < deadline:
                events = self.sel.select(0)
        return events or self.sel.select()

    def serve(self):
        while True:
            # The reader (or TLS) may hold a next frame that select() cannot see.
            while self.reader is not None and self.reader.buffered():
                self.on_client()
            for key, _ in self.wait():
                if key.data == "ctl":
                    self.on_control()
                elif self.client is not None:
                    self.on_client()


_NO_REPLY = frozenset(op for op, cls in m.MESSAGES.items() if cls.NO_REPLY)


def _same_secret(hello, secret: str, op: str) -> bool:
    given = hello.get("secret") if hello.get("op") == op else None
    return isinstance(given, str) and hmac.compare_digest(given.encode(), secret.encode())


def main(argv=None):
    p = argparse.ArgumentParser(prog="jupyter-elastic-gpu-worker")
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--agent-id", required=True)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cpu")
    p.add_argument("--cpu-memory-gib", type=float, default=16.0)
    p.add_argument("--namespaces", default="aten,prims,torchvision")
    p.add_argument("--tls", default=None, help="CERT,KEY,CLIENT_CA: sessions' connections use TLS")
    p.add_argument(
        "--warm", default=None, help="cuda or cuda:N: what to ready before a session (see server)"
    )
    p.add_argument(
        "--arena",
        default=None,
        type=lambda v: tuple(int(x) for x in v.split(",")),
        help="FD,BYTES: the agent's swap arena (agent/arena.py), inherited as a descriptor",
    )
    opts = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # interrupts are the client's, not ours
    # A dead agent closes the control socket, but a worker busy in a long op would not see
    # that until the op ends: leave with the agent regardless.
    exit_with_parent(f"worker of agent {opts.agent_id}")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    w = Worker(opts)
    if opts.warm and opts.device == "cuda":
        w.warm_up(opts.warm)
    w.notify(event="ready", pid=os.getpid())
    w.wait_for_assignment()
    w.serve()


if __name__ == "__main__":
    main()
