"""The OpenAI-compatible server, driven over real HTTP by the official `openai` client."""
import asyncio
import concurrent.futures
import json
import threading

import httpx
import pytest

from tests.helpers_chat import LiveServer, needs_triton_interpreter

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server():
    srv = LiveServer(slots=8, max_messages=6, max_chars_per_message=200, max_tokens=64)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)


MESSAGES = [{"role": "user", "content": "Hello there, who are you?"}]


def test_non_streaming(client):
    r = client.chat.completions.create(model="nanochat", messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_matches_non_streaming_at_temperature_0(client):
    full = client.chat.completions.create(model="nanochat", messages=MESSAGES, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model="nanochat", messages=MESSAGES, max_tokens=12, temperature=0,
                                            stream=True)
    parts, finish = [], None
    chunks = 0
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        chunks += 1
        delta = chunk.choices[0].delta
        if delta.content:
            parts.append(delta.content)
        finish = chunk.choices[0].finish_reason or finish
    assert chunks >= 3
    assert "".join(parts) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason


def test_sse_ends_with_done(server):
    body = {"model": "nanochat", "messages": MESSAGES, "stream": True, "max_tokens": 4}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["object"] == "chat.completion.chunk" for line in lines[:-1])


def test_n_samples_and_multi_turn(client):
    msgs = [{"role": "system", "content": "Be kind."}, *MESSAGES, {"role": "assistant", "content": "A friend."},
            {"role": "user", "content": "Tell me more"}]
    r = client.chat.completions.create(model="nanochat", messages=msgs, max_tokens=10, temperature=1.0, n=2,
                                       seed=3)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)


def test_concurrent_requests_are_batched(client, server):
    """Several clients at once: all complete, and each answer equals the one computed alone, greedy or
    seeded (requests with the same settings are sampled as one batch, each row's noise hashed from its
    request's seed)."""
    settings = [dict(temperature=0), dict(temperature=0.9, seed=1), dict(temperature=0.9, seed=2),
                dict(temperature=0.9, top_p=0.9, seed=3), dict(temperature=0.9, seed=4, n=2)]

    def ask(i):
        r = client.chat.completions.create(
            model="nanochat", messages=[{"role": "user", "content": f"Question number {i}: what say you?"}],
            max_tokens=10, **settings[i])
        return [c.message.content for c in r.choices]

    alone = [ask(i) for i in range(len(settings))]
    with concurrent.futures.ThreadPoolExecutor(len(settings)) as pool:
        together = list(pool.map(ask, range(len(settings))))
    assert together == alone


def test_mailbox_delivers_every_event_in_order_with_few_wakeups():
    """Events posted from another thread reach their queues in order, waking the loop far less often
    than once per event; a handler that fell behind gets its backlog in one batch."""
    from nanochat.web.app import _Mailbox, _ready_events

    async def main():
        box = _Mailbox(asyncio.get_running_loop())
        deliver, wakeups = box._deliver, []
        box._deliver = lambda: (wakeups.append(1), deliver())
        queues = [asyncio.Queue() for _ in range(8)]

        def scheduler():
            for step in range(300):
                for q in queues:
                    box.post(q, step)

        thread = threading.Thread(target=scheduler)
        thread.start()
        got = [[await q.get() for _ in range(300)] for q in queues]
        thread.join()
        assert got == [list(range(300))] * len(queues)
        assert len(wakeups) < 300 * len(queues) / 4, len(wakeups)
        for event in ("a", "b", "c"):
            queues[0].put_nowait(event)
        assert await _ready_events(queues[0]) == ["a", "b", "c"]

    asyncio.run(main())


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["nanochat"]
    h = httpx.get(f"{server.url}/health").json()
    assert h["status"] == "ok" and h["workers"] == 1
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text and "<script src" not in page.text


@pytest.mark.parametrize("payload, needle", [
    (b"{not json", "not valid JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}] * 7}).encode(), "too many messages"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 201}]}).encode(), "too long"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}).encode(), "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode(), "temperature"),
    (json.dumps({"messages": []}).encode(), "messages"),
    (json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}).encode(), "message 0"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}).encode(), "unknown role"),
    (json.dumps([1, 2]).encode(), "JSON object"),
])
def test_bad_requests_get_400_json(server, payload, needle):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=payload,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"


def test_openai_client_raises_on_400(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": "y" * 500}])


def test_web_load_warms_up_then_measures_each_row(server, capsys):
    from benchmarks import web_load
    web_load.main(["--url", server.url, "--clients", "1,3", "--duration_s", "0.5", "--max_tokens", "4",
                   "--max_requests", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("warm-up: 3 requests")  # one per client of the largest row, not counted
    rows = json.loads(lines[-1])["results"]
    assert [r["clients"] for r in rows] == [1, 3]
    assert [r["processes"] for r in rows] == [1, 3]  # a row's clients spread over client processes
    assert all(1 <= r["requests"] <= 2 * r["clients"] and r["tokens"] > 0 for r in rows), rows


def test_scheduler_builds_each_slot_index_once(server):
    """Index tensors for a request's rows are cached: each build copies from host memory (a GPU wait)."""
    worker = server.worker
    first = worker._rows_on_device([0, 2])
    assert worker._rows_on_device([0, 2]) is first and first.tolist() == [0, 2]
    assert worker._rows_on_device([1]) is not first


@needs_triton_interpreter
def test_scheduler_with_the_decode_kernel_streams_the_same_tokens():
    """--attention triton (the decode kernel, in Triton's interpreter on the CPU) changes no greedy token."""
    from nanochat.web.scheduler import BatchScheduler, GenerationRequest
    from tests.helpers_chat import tiny_model, tiny_tokenizer

    model, tok = tiny_model(), tiny_tokenizer()
    prompt = tok.encode("Where is my lord?", prepend="<|bos|>")
    streams = []
    for attention in ("torch", "triton"):
        worker = BatchScheduler(model, tok, slots=2, attention=attention)
        tokens, done = [], threading.Event()

        def emit(event, tokens=tokens, done=done):
            if event[0] == "token":
                tokens.append(event[2])
            else:  # "done", or "error": the comparison below fails on a short stream
                done.set()

        worker.submit(GenerationRequest(prompt=prompt, emit=emit, max_tokens=16, temperature=0.0))
        assert done.wait(60)
        worker.close()
        streams.append(tokens)
    assert streams[0] == streams[1] and len(streams[0]) > 3
