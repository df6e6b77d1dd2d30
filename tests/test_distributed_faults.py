"""Faults and bad configuration in the multi-process runtime: a rank that dies or
stalls makes every other rank exit within the set timeout naming it; mismatched
models/configs, P > N and a wrong world size are refused before any compute."""
from __future__ import annotations

import re

import pytest
import torch

from test_distributed import launch

TIMEOUT = 5          # --timeout given to the ranks (seconds)
GRACE = 10           # scheduling slack on a loaded 2-core machine
BASE = ["--family", "bert", "--seq-len", "12", "-m", "2", "--timeout", str(TIMEOUT)]


def _fault_time(err):
    m = re.search(r"PRISM_FAULT \w+ rank \d+ layer \d+ at ([0-9.]+)", err)
    assert m, err[-2000:]
    return float(m.group(1))


def test_dead_rank_is_named_and_others_exit():
    res, _ = launch(3, BASE, env_per_rank={1: {"PRISM_FAULT": "die:rank=1:layer=1"}}, timeout=90)
    ended = launch.ended
    assert res[1][0] == 17
    t_fault = _fault_time(res[1][2])
    for r in (0, 2):
        rc, out, err = res[r]
        assert rc == 3, err[-2000:]
        # the other survivor may have exited (naming rank 1) before this rank looked at its
        # connection too, so it can be named with rank 1; rank 1 must be among the dead
        assert re.search(r"error: (rank [02], )?rank 1(, rank [02])? died", err), err[-2000:]
        assert ended[r] - t_fault < TIMEOUT + GRACE


def test_stalled_rank_is_named_and_others_exit():
    res, _ = launch(3, BASE, env_per_rank={2: {"PRISM_FAULT": "stall:rank=2:layer=1:seconds=120"}},
                    timeout=90, hang_ok=(2,))
    ended = launch.ended
    assert res[2][0] is None          # still asleep when the others had left; killed by the test
    t_fault = _fault_time(res[2][2])
    for r in (0, 1):
        rc, out, err = res[r]
        assert rc == 3, err[-2000:]
        assert "rank 2 stalled" in err, err[-2000:]
        assert TIMEOUT - 1 < ended[r] - t_fault < TIMEOUT + GRACE


def test_different_model_or_config_refused_before_compute():
    res, _ = launch(3, BASE, env_per_rank={1: {"_args": ["--seed", "1"]},                 # other weights
                                           2: {"_args": ["--size", "small", "-m", "3"]}},  # other config, settings
                    timeout=90)
    for rc, out, err in res:
        assert rc == 2, err[-2000:]
        assert "refused before any compute" in err
        assert "rank 1 differs from rank 0 in weights" in err
        assert "rank 2 differs from rank 0 in config, weights, settings" in err
        assert "bytes received" not in out and "latency" not in out


def test_local_inputs_that_differ_refused_before_compute():
    """--input local: each rank embeds its slice of its own copy, so the copies must agree."""
    res, _ = launch(2, BASE + ["--input", "local"], env_per_rank={1: {"_args": ["--seq-len", "13"]}}, timeout=90)
    for rc, out, err in res:
        assert rc == 2, err[-2000:]
        assert "rank 1 holds another input than rank 0" in err, err[-2000:]


def test_local_inputs_that_agree_run():
    res, _ = launch(2, BASE + ["--input", "local", "--json"], timeout=90)
    for rc, out, err in res:
        assert rc == 0, err[-2000:]
    assert '"startup_bytes_per_rank": [0, 0]' in res[0][1], res[0][1][-2000:]


def test_more_partitions_than_tokens_refused():
    res, _ = launch(2, ["--family", "bert", "--seq-len", "1", "-m", "1", "--timeout", str(TIMEOUT)], timeout=90)
    for rc, out, err in res:
        assert rc == 2, err[-2000:]
        assert "2 partitions (world size) for 1 tokens" in err


def test_wrong_world_size_refused():
    res, _ = launch(2, BASE + ["--partitions", "3"], timeout=60)
    for rc, out, err in res:
        assert rc == 2 and "--partitions 3 but the world size is 2" in err, err[-2000:]


def test_send_posted_in_the_background_names_the_peer():
    """Transfers are posted by a background thread; a post that gloo refuses (the peer's
    connection closed) or one still blocked at the deadline is reported by the wait
    as a failure naming the peer, not as a traceback or a hang."""
    import time
    from concurrent.futures import Future
    from prism_kernels.distributed.comm import Pending, PeerFailure, _Poster

    class FakeComm:
        rank, timeout_s, wait_s = 0, 0.2, 0.0

    def raises():
        raise RuntimeError("[gloo] Connection closed by peer [10.0.0.2]:1234")

    poster = _Poster()
    dead = Pending(FakeComm(), "layer 3 exchange", [(1, poster.submit(raises))], [])
    with pytest.raises(PeerFailure, match=r"rank 1 died before layer 3 exchange on rank 0") as e:
        dead.wait()
    assert e.value.ranks == [1]
    stuck = Pending(FakeComm(), "layer 4 exchange", [(2, Future())], [])     # never completes
    t = time.monotonic()
    with pytest.raises(PeerFailure, match=r"rank 2 did not take data sent during layer 4 exchange"):
        stuck.wait(timeout_s=0.2)
    assert time.monotonic() - t < 5

    class Work:
        def wait(self, timeout=None):
            return True

    ok = Pending(FakeComm(), "layer 5 exchange", [(1, poster.submit(Work))], [])
    assert ok.wait() == {}


def test_receive_posted_in_the_background_names_the_peer():
    """A receive whose post is refused (dead peer) or never returns (stalled) is
    reported by the wait naming the peer."""
    from concurrent.futures import Future
    from prism_kernels.distributed.comm import Pending, PeerFailure, _Poster

    class FakeComm:
        rank, timeout_s, wait_s = 1, 0.2, 0.0

    def raises():
        raise RuntimeError("[gloo] Connection reset by peer")

    buf = torch.zeros(3)
    dead = Pending(FakeComm(), "layer 2 exchange", [], [(0, _Poster().submit(raises), buf)])
    with pytest.raises(PeerFailure, match=r"rank 0 died during layer 2 exchange on rank 1"):
        dead.wait()
    stuck = Pending(FakeComm(), "layer 2 exchange", [], [(2, Future(), buf)])
    with pytest.raises(PeerFailure, match=r"rank 2 stalled"):
        stuck.wait(timeout_s=0.2)
