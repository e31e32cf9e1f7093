"""The chat server under hostile or careless clients: body size, slow and idle connections, clients
that go away, malformed fields. Loopback only; every wait is bounded (seconds)."""
import json
import socket
import threading
import time

import httpx
import pytest

from tests.helpers_chat import LiveServer

BODY_CAP = 256 * 1024  # room for JSON nested 100k deep (200 KB)
MESSAGES = [{"role": "user", "content": "Hello there, who are you?"}]
STEP_S = 0.01  # a decode step on the stand-in slow device


@pytest.fixture(scope="module")
def server():
    """Short timeouts, a small body cap, every answer runs to max_tokens (no end-of-turn token) and each
    decode step takes >= 10 ms, so that a generation lasts as long as a test needs."""
    srv = LiveServer(slots=4, max_tokens=1000, max_body_bytes=BODY_CAP,
                     server={"read_timeout_s": 0.5, "keep_alive_s": 0.5})
    srv.worker.engine.tools.stop_ids = set()
    step = srv.worker.decoder.step
    srv.worker.decoder.step = lambda: (time.sleep(STEP_S), step())[1]
    yield srv
    srv.close()


def open_request(port: int, body: bytes, path: str = "/v1/chat/completions", headers: str = "") -> socket.socket:
    """A raw HTTP/1.1 POST whose response is left unread."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{headers}\r\n")
    sock.sendall(head.encode() + body)
    return sock


def seconds_until_closed(sock: socket.socket, limit: float) -> float | None:
    """Reads (and drops) what the server sends until it closes the connection: seconds taken, or None
    when it is still open after `limit`."""
    start = time.perf_counter()
    sock.settimeout(0.1)
    while time.perf_counter() - start < limit:
        try:
            if sock.recv(65536) == b"":
                return time.perf_counter() - start
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.perf_counter() - start
    return None


def wait_for(condition, limit: float) -> float | None:
    """Seconds until `condition()` holds, or None past `limit`."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        if condition():
            return time.perf_counter() - start
        time.sleep(0.02)
    return None


def post(server, body, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60, **kw)


# ---- the request body ---------------------------------------------------------------------------

def test_default_body_cap_is_one_mib():
    from nanochat.web.params import Limits
    assert Limits().max_body_bytes == 1 << 20


def test_the_servers_limit_flags_are_the_limits_it_enforces():
    """scripts.chat_web's config is a Limits (the flags declared once); a default reply length over the cap is
    lowered to the cap, whoever builds the Limits."""
    from nanochat.flags import parse_flags
    from nanochat.web.params import Limits
    from scripts.chat_web import FLAG_ALIASES, WebConfig
    cfg = parse_flags(WebConfig, ["-i", "base", "--max_tokens=100", "--max_n=2"], aliases=FLAG_ALIASES)
    assert isinstance(cfg, Limits) and (cfg.source, cfg.max_tokens, cfg.max_n) == ("base", 100, 2)
    assert cfg.default_max_tokens == 100 and Limits(max_tokens=64).default_max_tokens == 64
    assert Limits(max_tokens=1000, default_max_tokens=40).default_max_tokens == 40


def test_body_over_the_cap_by_its_length_gets_413_before_it_is_sent(server):
    """Content-Length says 50 MB; none of it is sent, and the 413 comes anyway, closing the connection."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 50000000\r\n\r\n")
    sock.settimeout(5)
    reply = sock.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 413"), reply
    err = json.loads(reply.split("\r\n\r\n", 1)[1])["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "request_too_large"
    assert "50000000" in err["message"] and "--max_body_bytes" in err["message"]
    assert seconds_until_closed(sock, 3) is not None
    sock.close()


def test_chunked_body_over_the_cap_gets_413(server):
    """No Content-Length (chunked upload): the server stops reading once the cap is passed."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b" " * 16384
    for _ in range(BODY_CAP // len(chunk) + 2):
        sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    sock.settimeout(5)
    reply = sock.recv(65536).decode()
    sock.close()
    assert reply.startswith("HTTP/1.1 413"), reply
    assert json.loads(reply.split("\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"


def test_body_at_the_cap_is_served(server):
    body = json.dumps({"messages": MESSAGES, "max_tokens": 2}).encode()
    body += b" " * (BODY_CAP - len(body))
    r = httpx.post(f"{server.url}/v1/chat/completions", content=body, timeout=60)
    assert r.status_code == 200, r.text


def test_a_slow_parse_does_not_stall_the_event_loop(server, monkeypatch):
    """The body is parsed (and validated, tokenized) in a worker thread: while one takes a second,
    /health still answers at once."""
    from nanochat.web import app as app_module
    parse = app_module._parse_json
    monkeypatch.setattr(app_module, "_parse_json", lambda raw: (time.sleep(1.0), parse(raw))[1])
    slow = threading.Thread(target=post, args=(server, {"messages": MESSAGES, "max_tokens": 2}))
    slow.start()
    time.sleep(0.2)
    start = time.perf_counter()
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    health_s = time.perf_counter() - start
    slow.join(timeout=30)
    assert health_s < 0.5, f"/health took {health_s:.2f} s while a request was being parsed"


# ---- clients that go away -----------------------------------------------------------------------

def test_non_streaming_client_that_goes_away_frees_its_slots(server):
    """n=2, 500 tokens (>= 5 s at 10 ms a step); the client hangs up after the first steps: both slots
    are free within a second, and the request counts as cancelled in /metrics."""
    worker = server.worker
    before = cancelled(server)
    sock = open_request(server.port, json.dumps({"messages": MESSAGES, "max_tokens": 500, "n": 2}).encode())
    assert wait_for(lambda: worker.stats()["active"] == 2, 10) is not None
    time.sleep(0.1)
    sock.close()
    assert wait_for(lambda: worker.stats()["active"] == 0, 1.5) is not None, worker.stats()
    assert wait_for(lambda: cancelled(server) == before + 1, 2) is not None


def test_streaming_client_that_goes_away_frees_its_slot(server):
    worker = server.worker
    body = {"messages": MESSAGES, "max_tokens": 500, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert wait_for(lambda: worker.stats()["active"] == 1, 5) is not None
    assert wait_for(lambda: worker.stats()["active"] == 0, 1.5) is not None, worker.stats()


def test_queued_request_whose_client_goes_away_is_never_prefilled(server, monkeypatch):
    """All 4 slots busy, a fifth request waits; its client leaves, then the first: the worker goes idle
    without ever prefilling the fifth."""
    worker = server.worker
    prefilled, prefill = [], worker.engine.prefill_batch
    monkeypatch.setattr(worker.engine, "prefill_batch", lambda ps: (prefilled.append(len(ps)), prefill(ps))[1])
    busy = open_request(server.port, json.dumps({"messages": MESSAGES, "max_tokens": 500, "n": 4}).encode())
    assert wait_for(lambda: worker.stats()["active"] == 4, 10) is not None
    queued = open_request(server.port, json.dumps({"messages": MESSAGES, "max_tokens": 5}).encode())
    assert wait_for(lambda: worker.stats()["queued"] == 1, 5) is not None
    queued.close()
    time.sleep(0.2)
    busy.close()
    assert wait_for(lambda: worker.stats() == {"slots": 4, "active": 0, "queued": 0}, 2) is not None, worker.stats()
    assert prefilled == [1]


def cancelled(server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("nanochat_cancelled_requests_total"))


# ---- slow and idle connections ------------------------------------------------------------------

def test_connection_that_sends_nothing_is_closed(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    took = seconds_until_closed(sock, 3)
    sock.close()
    assert took is not None and took >= 0.3, took


def test_headers_sent_a_byte_at_a_time_are_cut_off(server):
    """Slowloris: each byte arrives in time for any per-read timeout, the request never completes."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    start, closed = time.perf_counter(), False
    try:
        for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200:
            sock.sendall(bytes([byte]))
            time.sleep(0.05)
            if time.perf_counter() - start > 3:
                break
    except (BrokenPipeError, ConnectionResetError):
        closed = True
    closed = closed or seconds_until_closed(sock, 0.5) is not None
    sock.close()
    assert closed and time.perf_counter() - start < 3


def test_body_that_never_completes_is_cut_off(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"messages\"")
    took = seconds_until_closed(sock, 3)
    sock.close()
    assert took is not None, "a request whose body stopped halfway kept its connection"


def test_idle_keep_alive_connection_is_closed(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    sock.settimeout(5)
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    took = seconds_until_closed(sock, 3)
    sock.close()
    assert took is not None and took < 2, took


def test_answer_longer_than_the_read_timeout_is_not_cut(server):
    """The deadline is for receiving a request: a 100-token answer (>= 1 s, twice the read timeout) and
    a stream as long arrive whole."""
    r = post(server, {"messages": MESSAGES, "max_tokens": 100})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 100
    body = {"messages": MESSAGES, "max_tokens": 100, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


# ---- malformed fields -----------------------------------------------------------------------------

@pytest.mark.parametrize("payload, param, needle", [
    ('{"messages": %s, "top_k": 1%s}' % (json.dumps(MESSAGES), "0" * 400), "top_k", "between"),
    ('{"messages": %s, "seed": -1%s}' % (json.dumps(MESSAGES), "0" * 400), "seed", "between"),
    ('{"messages": %s, "n": 1e400}' % json.dumps(MESSAGES), "n", "integer"),
    ('{"messages": %s, "temperature": NaN}' % json.dumps(MESSAGES), "temperature", "between"),
    ("[" * 100_000 + "]" * 100_000, None, "nested too deeply"),
    ('{"messages": %s, "stream": "false"}' % json.dumps(MESSAGES), "stream", "true or false"),
    ('{"messages": %s, "stream": 0}' % json.dumps(MESSAGES), "stream", "true or false"),
    ('{"messages": %s, "max_tokens": 3, "max_completion_tokens": 4}' % json.dumps(MESSAGES),
     "max_completion_tokens", "differ"),
])
def test_malformed_fields_get_400_naming_them(server, payload, param, needle):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=payload.encode(), timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["param"] == param and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("fields", [{"max_tokens": 3, "max_completion_tokens": None},
                                    {"max_completion_tokens": 3, "max_tokens": None},
                                    {"max_completion_tokens": 3, "max_tokens": 3}])
def test_the_max_tokens_field_that_is_set_is_honoured(server, fields):
    r = post(server, {"messages": MESSAGES, **fields})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
