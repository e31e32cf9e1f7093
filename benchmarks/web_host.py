"""The chat server's host (Python) cost per streamed token, measured on the CPU apart from the model.

    python -m benchmarks.web_host --clients 1,32 --duration_s 10
    python -m benchmarks.web_host --clients 32 --profile 15     # plus the top cProfile lines per thread

Serves the app in this process (uvicorn in a thread, the tests' tiny random model, one torch thread)
and loads it with benchmarks.web_load in a child process, one row of clients at a time, at a lower CPU
priority (--client_nice) so that on a machine of few cores the load does not take the server's cores.
The scheduler's model calls are timed apart, so what is left is host work, independent of the model's
speed: per decode step, the scheduler's own time ("host ms") beside its model calls and waits for them
("decode ms") and the prefills of the requests it admitted between steps ("prefill ms", per step); per
token, CPU time of the scheduler thread (model time taken out), of the event-loop thread (HTTP, SSE
chunks, text decoding) and of the web_load client process. --stub_model skips the model's decode step
altogether (every slot keeps sampling from its prompt's next-token distribution): tokens/s is then the
host's own ceiling on this machine. --stub_step_ms X also stands in for a GPU that takes X ms per step:
the step is launched at once and runs for X ms after the previous one, and the scheduler's waits for the
device (for a step's tokens, or before a prefill) sleep until it is done, releasing the GIL as a CUDA
wait does; the host's work and the device's steps then overlap (or not) as they would on a GPU:

    python -m benchmarks.web_host --stub_step_ms 1.3 --clients 1,32    # ~ the H200's d20 step at 32 rows
"""
from __future__ import annotations

import contextlib
import cProfile
import io
import json
import os
import pstats
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from nanochat.flags import parse_flags


@dataclass
class HostConfig:
    clients: list[int] = field(default_factory=lambda: [1, 32])
    duration_s: float = 10.0
    max_tokens: int = 128
    slots: int = 32
    stub_model: bool = False        # decode steps return the last logits untouched: host work alone
    stub_step_ms: float = 0.0       # > 0: stub_model, on a stand-in device that takes this long per step
    profile: int = 0                # > 0: print this many cProfile lines (by own time) per server thread
    client_nice: int = 10           # the load processes' niceness: the server's threads get a core when they
                                    # wake, as on a GPU host with cores to spare (0: compete as equals)


def thread_cpu_s(tid: int) -> float:
    """User + system CPU seconds of one thread of this process (Linux /proc, 10 ms resolution)."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stub_decode(worker, step_ms: float) -> None:
    """Replace `worker`'s decode step by a stand-in device: a step is launched at once and ends step_ms
    after the later of its launch and the previous step's end; positions advance as in a real step (the
    sampler's noise is keyed by them) and every slot keeps sampling from its last logits. Waiting for a
    step's tokens sleeps until the step before it ends (they were sampled after it); a prefill first
    waits for the device to be idle (its prompt is copied from pageable memory)."""
    clock = {"done": 0.0, "tokens": 0.0}  # perf_counter times: last step's end, the fed tokens' readiness

    def sleep_until(t: float) -> None:
        if (left := t - time.perf_counter()) > 0:
            time.sleep(left)

    def step():
        clock["tokens"] = clock["done"]
        clock["done"] = max(time.perf_counter(), clock["done"]) + step_ms / 1e3
        worker.decoder.pos += 1
        return worker.logits

    fetch = worker._fetch_tokens

    def fetch_tokens():
        sleep_until(clock["tokens"])
        return fetch()

    def idle(prefill):
        def idle_prefill(*args, **kw):
            sleep_until(clock["done"])
            return prefill(*args, **kw)
        return idle_prefill
    worker.decoder.step, worker._fetch_tokens = step, fetch_tokens
    worker.engine.prefill_batch = idle(worker.engine.prefill_batch)


class Timed:
    """Wraps the scheduler's model calls and its step to add up their time, its steps and the tokens
    they sampled (the slots active at each step). Decode time counts the step and the wait for its
    tokens (inside the scheduler's step); prefill time, the admissions (between steps)."""

    def __init__(self, worker):
        self.decode_s = self.prefill_s = self.step_s = 0.0  # wall seconds
        self.model_cpu_s = 0.0                              # the scheduler thread's CPU seconds in model calls
        self.steps = self.rows = 0
        for obj, name, kind in ((worker.decoder, "step", "decode_s"), (worker, "_fetch_tokens", "decode_s"),
                                (worker.engine, "prefill_batch", "prefill_s")):
            setattr(obj, name, self._model(getattr(obj, name), kind))
        step = worker._step

        def timed_step():
            self.steps += 1
            self.rows += sum(s is not None for s in worker.slots)
            start = time.perf_counter()
            try:
                return step()
            finally:
                self.step_s += time.perf_counter() - start
        worker._step = timed_step

    def _model(self, fn, kind: str):
        def wrapped(*args, **kw):
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kw)
            finally:
                setattr(self, kind, getattr(self, kind) + time.perf_counter() - start)
                self.model_cpu_s += time.thread_time() - cpu
        return wrapped

    def snapshot(self) -> tuple[float, float, float, float, int, int]:
        return self.decode_s, self.prefill_s, self.model_cpu_s, self.step_s, self.steps, self.rows


def start_server(slots: int, profiles: dict[str, cProfile.Profile] | None):
    """(worker, uvicorn server, url): the tests' tiny model behind the real app, in this process."""
    import socket

    import uvicorn

    from nanochat.web.app import create_app
    from nanochat.web.scheduler import BatchScheduler
    from tests.helpers_chat import tiny_model, tiny_tokenizer

    class ProfiledScheduler(BatchScheduler):
        def _loop(self):
            with profiles["scheduler"] if profiles else contextlib.nullcontext():
                super()._loop()

    worker = ProfiledScheduler(tiny_model(sequence_len=512), tiny_tokenizer(), slots=slots)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app([worker]), host="127.0.0.1", port=port, log_level="warning"))

    def serve():
        with profiles["event loop"] if profiles else contextlib.nullcontext():
            server.run()
    server.thread = threading.Thread(target=serve, daemon=True)
    server.thread.start()
    while not server.started:
        time.sleep(0.05)
    return worker, server, f"http://127.0.0.1:{port}"


def load(url: str, clients: int, duration_s: float, max_tokens: int, max_requests: int = 10_000,
         client_nice: int = 0) -> dict:
    """One web_load row in a child process (at niceness `client_nice`): its JSON result plus the
    child's CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    nice = ["nice", "-n", str(client_nice)] if client_nice else []
    out = subprocess.run([*nice, sys.executable, "-m", "benchmarks.web_load", "--url", url, "--clients", str(clients),
                          "--duration_s", str(duration_s), "--max_tokens", str(max_tokens), "--warmup", "false",
                          "--max_requests", str(max_requests)], check=True, capture_output=True, text=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    row = json.loads(out.strip().splitlines()[-1])["results"][0]
    row["client_cpu_s"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return row


def main(argv: list[str] | None = None) -> None:
    cfg = parse_flags(HostConfig, argv, description=__doc__)
    torch.set_num_threads(1)
    profiles = {"scheduler": cProfile.Profile(), "event loop": cProfile.Profile()} if cfg.profile else None
    worker, server, url = start_server(cfg.slots, profiles)
    if cfg.stub_model or cfg.stub_step_ms:
        stub_decode(worker, cfg.stub_step_ms)
    timed = Timed(worker)
    load(url, max(cfg.clients), 1.0, cfg.max_tokens, max_requests=1, client_nice=cfg.client_nice)  # not counted
    rows = []
    for n in cfg.clients:
        sched_tid, loop_tid = worker.thread.native_id, server.thread.native_id
        sched0, loop0, cpu0 = thread_cpu_s(sched_tid), thread_cpu_s(loop_tid), time.process_time()
        before = timed.snapshot()
        row = load(url, n, cfg.duration_s, cfg.max_tokens, client_nice=cfg.client_nice)
        decode_s, prefill_s, model_cpu, step_s, steps, tokens = (b - a for a, b in zip(before, timed.snapshot()))
        sched_host = thread_cpu_s(sched_tid) - sched0 - model_cpu
        loop_cpu = thread_cpu_s(loop_tid) - loop0
        us = lambda s: round(1e6 * s / max(tokens, 1), 1)  # noqa: E731  per token sampled
        rows.append({
            "clients": n, "tokens_per_s": round(tokens / row["seconds"], 1), "chunks_per_s": row["tokens_per_s"],
            "rows_per_step": round(tokens / max(steps, 1), 1),
            "step_ms": round(1e3 * row["seconds"] / max(steps, 1), 3),
            "step_decode_ms": round(1e3 * decode_s / max(steps, 1), 3),
            "step_host_ms": round(1e3 * (step_s - decode_s) / max(steps, 1), 3),
            "prefill_ms_per_step": round(1e3 * prefill_s / max(steps, 1), 3),
            "us_per_token": {"scheduler_host": us(sched_host), "event_loop": us(loop_cpu),
                             "server_host": us(time.process_time() - cpu0 - model_cpu),
                             "client": us(row["client_cpu_s"])},
        })
    server.should_exit = True
    server.thread.join(timeout=10)
    worker.close()
    print(f"{'clients':>8} {'tok/s':>8} {'rows/step':>10} {'step ms':>8} {'decode ms':>10} {'host ms':>8} "
          f"{'prefill ms':>11} {'sched us/tok':>13} {'loop us/tok':>12} {'server us/tok':>14} {'client us/tok':>14}")
    for r in rows:
        u = r["us_per_token"]
        print(f"{r['clients']:>8} {r['tokens_per_s']:>8} {r['rows_per_step']:>10} {r['step_ms']:>8} "
              f"{r['step_decode_ms']:>10} {r['step_host_ms']:>8} {r['prefill_ms_per_step']:>11} "
              f"{u['scheduler_host']:>13} {u['event_loop']:>12} {u['server_host']:>14} {u['client']:>14}")
    for name, prof in (profiles or {}).items():
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(cfg.profile)
        print(f"--- {name} thread, by own time\n" + "\n".join(text.getvalue().splitlines()[6:]))
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
