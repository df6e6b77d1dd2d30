"""Point-to-point exchanges with deadlines, byte counting and named failures.

Every transfer is an exact-size gloo (or NCCL) isend/irecv: the bytes counted are
the bytes of the tensors that cross between ranks, nothing padded (gloo's
all_gather needs equal sizes, which uneven partitions or means would pad).
An exchange is started (`start`) and finished later (`Pending.wait`), so a device
can compute while it is in flight (overlap.py). Receives and sends are posted by one
background thread (`_Poster`, in the order given): over a slow link gloo's isend and
irecv can block their caller asleep (at 200 Mbit/s: 4-5 ms median per isend on the ViT
rank that is behind, up to 6-7 ms a call for BERT; benchmarks/netem/post_timing.py),
which would stall the compute they are meant to overlap.

Failures: every wait has a deadline (`timeout_s`). A peer that does not deliver in
time is reported as stalled, a peer whose connection breaks as dead; either way
the error names the rank, and the caller (launch.py) exits non-zero at once.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist


class PeerFailure(RuntimeError):
    """A peer rank died or stalled; `.ranks` names it (them)."""

    def __init__(self, ranks: Sequence[int], what: str, detail: str = ""):
        self.ranks = sorted(set(ranks))
        names = ", ".join(f"rank {r}" for r in self.ranks)
        msg = f"{names} {what}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


def _looks_dead(err: BaseException) -> bool:
    s = str(err).lower()
    return any(w in s for w in ("connection closed", "connection reset", "broken pipe", "peer",
                                 "socket", "eof", "closed by"))


@dataclass
class ByteCounter:
    """Bytes received by this rank, per (phase, layer)."""
    recv: Dict[tuple, int] = field(default_factory=lambda: defaultdict(int))
    sent: Dict[tuple, int] = field(default_factory=lambda: defaultdict(int))

    def per_layer(self, phase: str = "layer") -> Dict[int, int]:
        return {k[1]: v for k, v in sorted(self.recv.items()) if k[0] == phase}

    def as_dict(self):
        return {"recv": {f"{k[0]}:{k[1]}": v for k, v in self.recv.items()},
                "sent": {f"{k[0]}:{k[1]}": v for k, v in self.sent.items()}}


class _Poster:
    """One daemon thread that posts irecvs and isends in the order given, so that a
    post that blocks does not block the compute thread (gloo releases the GIL while
    it blocks). A daemon: a post stuck on a dead peer never holds up the exit."""

    def __init__(self):
        self._q: "queue.Queue" = queue.Queue()
        threading.Thread(target=self._run, name="prism-post", daemon=True).start()

    def _run(self):
        while True:
            fut, fn = self._q.get()
            try:
                fut.set_result(fn())
            except BaseException as e:      # delivered to the waiter, which names the peer
                fut.set_exception(e)

    def submit(self, fn) -> Future:
        fut: Future = Future()
        self._q.put((fut, fn))
        return fut


class Pending:
    """Receives (and sends) in flight; wait() returns {peer: tensor}."""

    def __init__(self, comm: "Comm", what: str, sends, recvs):
        self.comm, self.what = comm, what
        self.sends = sends      # [(peer, Future of the work)]
        self.recvs = recvs      # [(peer, Future of the work, tensor)]

    def wait(self, timeout_s: Optional[float] = None) -> Dict[int, torch.Tensor]:
        """timeout_s: this wait's deadline instead of the Comm's (a rank idle while another
        works for an unknown time, e.g. decoding; a broken connection is still reported)."""
        t_start = time.perf_counter()
        try:
            return self._wait(self.comm.timeout_s if timeout_s is None else float(timeout_s))
        finally:
            self.comm.wait_s += time.perf_counter() - t_start

    def _wait(self, timeout_s: float) -> Dict[int, torch.Tensor]:
        deadline = time.monotonic() + timeout_s
        out = {}
        stalled, dead = [], []
        errors = {}
        for peer, work, buf in self.recvs:
            left = max(0.05, deadline - time.monotonic())
            try:
                work = work.result(timeout=left)          # the post (refused: the peer is dead)
                left = max(0.05, deadline - time.monotonic())
                ok = work.wait(timeout=timedelta(seconds=left))
                if ok is False:
                    stalled.append(peer)
                    continue
                out[peer] = buf
            except Exception as e:  # timeout, or the connection to the peer broke
                (dead if _looks_dead(e) and "timeout" not in str(e).lower() else stalled).append(peer)
                errors[peer] = (str(e).splitlines() or [type(e).__name__])[0][:200]
        if dead:
            raise PeerFailure(dead, f"died during {self.what} on rank {self.comm.rank}",
                              "; ".join(errors.get(p, "") for p in dead))
        if stalled:
            raise PeerFailure(stalled, f"stalled: nothing received within {timeout_s:g} s "
                              f"during {self.what} on rank {self.comm.rank}")
        for peer, work in self.sends:
            left = max(0.05, deadline - time.monotonic())
            try:
                work = work.result(timeout=left)
            except RuntimeError as e:       # gloo refused to post: the peer's connection closed
                if not _looks_dead(e):
                    raise
                raise PeerFailure([peer], f"died before {self.what} on rank {self.comm.rank}",
                                  str(e).splitlines()[0][:200]) from None
            except Exception as e:          # the post itself did not return in time
                raise PeerFailure([peer], f"did not take data sent during {self.what} on rank "
                                  f"{self.comm.rank}", (str(e).splitlines() or ["timeout"])[0][:200]) from None
            left = max(0.05, deadline - time.monotonic())
            try:
                work.wait(timeout=timedelta(seconds=left))
            except Exception as e:
                raise PeerFailure([peer], f"did not take data sent during {self.what} on rank "
                                  f"{self.comm.rank}", str(e).splitlines()[0][:200]) from None
        return out


class Comm:
    def __init__(self, timeout_s: float = 60.0, group=None):
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.timeout_s = float(timeout_s)
        self.group = group
        self.bytes = ByteCounter()
        self.wait_s = 0.0          # time spent blocked in Pending.wait (reset by the caller)
        self.post_s = 0.0          # time spent posting transfers (copies, casts, handing the posts to the posting thread; reset by the caller)
        self._tag = 0
        self._poster: Optional[_Poster] = None     # started at the first exchange

    @staticmethod
    def _nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def start(self, what: str, phase: str, layer: int, send: Dict[int, torch.Tensor],
              recv: Dict[int, torch.Tensor]) -> Pending:
        """Post receives into the given buffers and sends of the given tensors.

        Receives are posted first, then sends, in increasing peer order; gloo
        matches by (peer, tag), so the order of posting does not deadlock.
        """
        t_start = time.perf_counter()
        try:
            return self._start(what, phase, layer, send, recv)
        finally:
            self.post_s += time.perf_counter() - t_start

    def _start(self, what, phase, layer, send, recv) -> Pending:
        self._tag += 1
        tag = self._tag
        recvs, sends = [], []
        if self._poster is None and (recv or send):
            self._poster = _Poster()
        # a post gloo refuses (a peer whose connection has closed) fails its Future: the wait
        # reports it naming the peer
        for peer in sorted(recv):
            buf = recv[peer]
            recvs.append((peer, self._poster.submit(
                lambda buf=buf, peer=peer: dist.irecv(buf, src=peer, group=self.group, tag=tag)), buf))
            self.bytes.recv[(phase, layer)] += self._nbytes(buf)
        for peer in sorted(send):
            t = send[peer].contiguous()
            sends.append((peer, self._poster.submit(
                lambda t=t, peer=peer: dist.isend(t, dst=peer, group=self.group, tag=tag))))
            self.bytes.sent[(phase, layer)] += self._nbytes(t)
        return Pending(self, what, sends, recvs)

    def barrier(self, what: str):
        """A barrier that names the ranks that do not arrive (gloo monitored_barrier)."""
        if self.world == 1:
            return
        try:
            dist.monitored_barrier(group=self.group, timeout=timedelta(seconds=self.timeout_s),
                                   wait_all_ranks=True)
        except Exception as e:
            import re
            msg = str(e)
            ranks = [int(r) for r in re.findall(r"\d+", msg.split("ranks:")[-1])] if "ranks:" in msg else []
            if ranks:
                raise PeerFailure(ranks, f"did not reach the {what} barrier on rank {self.rank} "
                                  f"within {self.timeout_s:g} s") from None
            ranks = [0] if self.rank != 0 else []
            raise PeerFailure(ranks or [-1], f"failed the {what} barrier seen from rank {self.rank}",
                              msg.splitlines()[0][:300]) from None
