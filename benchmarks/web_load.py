"""Load a running chat server with concurrent streaming clients; report total tokens/s.

    python -m scripts.chat_web -i sft --port 8000 &
    python -m benchmarks.web_load --url http://127.0.0.1:8000 --clients 1,32

Each client loops: POST a streaming chat completion (temperature 0.8, max_tokens tokens), read the
stream to the end, repeat, until `duration_s` has passed or it made `max_requests` requests. Streamed
content chunks are counted as tokens (the server sends one chunk per decoded piece of text, so this
slightly undercounts). Before the timed rows, one untimed request per client of the largest row warms
the server up (its first requests compile and capture the decode step). The clients of a row are spread
over up to `processes` client processes, started together: one Python process parsing 32 streams spent
~170 µs of CPU per token (benchmarks.web_host), a whole core at ~5,800 tokens/s, so a single load process
capped the very figure it measures.
Loopback only: the URL must point at 127.0.0.1/localhost.
Last line: one JSON object, with the 32-vs-1 client speedup (target >= 10x).
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import queue
import time
from dataclasses import dataclass, field, replace
from urllib.parse import urlparse

import httpx

from nanochat.flags import parse_flags


@dataclass
class LoadConfig:
    url: str = "http://127.0.0.1:8000"
    clients: list[int] = field(default_factory=lambda: [1, 32])
    duration_s: float = 30.0
    max_requests: int = 20          # per client
    max_tokens: int = 128
    warmup: bool = True             # one untimed request per client of the largest row first
    processes: int = 4              # client processes per row (its clients split among them)
    prompt: str = "Write a short story about a robot learning to paint."


async def client_loop(cfg: LoadConfig, deadline: float, i: int) -> tuple[int, int]:
    """One client, with its own connection pool: in one pool shared by 32 clients, httpx scanned every
    connection at each request's start and end (~15% of this process's CPU at 32 clients). No TLS on
    loopback: verify=False skips loading the CA certificates, ~30 ms per client, inside the timing."""
    tokens = requests = 0
    body = {"stream": True, "max_tokens": cfg.max_tokens, "temperature": 0.8,
            "seed": i, "messages": [{"role": "user", "content": f"{cfg.prompt} (#{i})"}]}
    async with httpx.AsyncClient(base_url=cfg.url, timeout=httpx.Timeout(300.0), verify=False) as http:
        while time.perf_counter() < deadline and requests < cfg.max_requests:
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        delta = json.loads(line[6:])["choices"][0]["delta"]
                        tokens += bool(delta.get("content"))
            requests += 1
    return tokens, requests


async def run_clients(cfg: LoadConfig, clients: list[int]) -> tuple[int, int, float]:
    """These clients until the deadline: (tokens, requests, seconds)."""
    start = time.perf_counter()
    results = await asyncio.gather(*(client_loop(cfg, start + cfg.duration_s, i) for i in clients))
    return sum(t for t, _ in results), sum(r for _, r in results), time.perf_counter() - start


def _client_process(cfg: LoadConfig, clients: list[int], barrier, results) -> None:
    """One client process: imported and connected to the barrier, it starts with its siblings."""
    barrier.wait()
    try:
        results.put(asyncio.run(run_clients(cfg, clients)))
    except Exception as exc:
        results.put(f"{type(exc).__name__}: {exc}")


def measure(cfg: LoadConfig, n: int) -> dict:
    """n clients, spread over min(n, processes) processes; the row's seconds are the longest process's."""
    k = max(1, min(n, cfg.processes))
    if k == 1:
        parts = [asyncio.run(run_clients(cfg, list(range(n))))]
    else:
        ctx = multiprocessing.get_context("spawn")  # not fork: the caller may hold threads (a server in tests)
        barrier, results = ctx.Barrier(k), ctx.Queue()
        procs = [ctx.Process(target=_client_process, args=(cfg, list(range(i, n, k)), barrier, results))
                 for i in range(k)]
        for p in procs:
            p.start()
        parts = []
        try:
            for _ in procs:
                part = results.get(timeout=cfg.duration_s + 600)
                if isinstance(part, str):
                    raise RuntimeError(f"a web_load client process failed: {part}")
                parts.append(part)
        except queue.Empty:
            raise RuntimeError("a web_load client process did not report (see its traceback above)") from None
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    tokens, requests = sum(p[0] for p in parts), sum(p[1] for p in parts)
    elapsed = max(p[2] for p in parts)
    return {"clients": n, "processes": k, "requests": requests, "tokens": tokens,
            "seconds": round(elapsed, 2), "tokens_per_s": round(tokens / elapsed, 1)}


def main(argv: list[str] | None = None) -> None:
    cfg = parse_flags(LoadConfig, argv, description=__doc__)
    host = urlparse(cfg.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"web_load only targets a local server (got host {host!r}); use --url http://127.0.0.1:PORT")
    httpx.get(cfg.url + "/health", timeout=10).raise_for_status()
    if cfg.warmup:
        warm = measure(replace(cfg, max_requests=1), max(cfg.clients))
        print(f"warm-up: {warm['requests']} requests in {warm['seconds']} s (not counted)")
    rows = [measure(cfg, n) for n in cfg.clients]
    print(f"{'clients':>8} {'processes':>10} {'requests':>9} {'tokens':>8} {'seconds':>8} {'tokens/s':>9}")
    for r in rows:
        print(f"{r['clients']:>8} {r['processes']:>10} {r['requests']:>9} {r['tokens']:>8} {r['seconds']:>8} "
              f"{r['tokens_per_s']:>9}")
    by_n = {r["clients"]: r["tokens_per_s"] for r in rows}
    speedup = round(by_n[max(by_n)] / by_n[min(by_n)], 2) if by_n.get(min(by_n)) else None
    print(json.dumps({"url": cfg.url, "results": rows, "speedup_max_vs_min_clients": speedup}))


if __name__ == "__main__":
    main()
