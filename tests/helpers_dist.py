"""Run a test function in several CPU processes joined by a gloo process group (torch.multiprocessing)."""
from __future__ import annotations

import os
import socket
import sys
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.common import compute_cleanup


def spawn_gloo(fn: Callable[..., None], world_size: int, *args) -> None:
    """Call `fn(rank, world_size, *args)` in `world_size` fresh processes, one thread each; raises if any
    rank fails. `fn` must be a module-level function (the children import it by name)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(fn, world_size, port, args), nprocs=world_size, join=True)


def _rank_main(rank: int, fn: Callable[..., None], world_size: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    fn(rank, world_size, *args)  # an exception propagates: mp.spawn reports it with its traceback
    compute_cleanup()
    # Skip interpreter finalization: torch 2.13's gloo teardown there aborts about 1 run in 40 on a busy
    # machine ("terminate called without an active exception", after fn returned and the group was
    # destroyed), which would fail a test whose results are already on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
