"""The OpenAI-compatible server, driven over real HTTP by the official `openai` client."""
import asyncio
import concurrent.futures
import functools
import json
import threading

import httpx
import pytest
import torch

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
    """Events posted from another thread reach their inboxes in order, waking the loop far less often
    than once per event; a handler that fell behind gets its backlog in one batch."""
    from nanochat.web.app import _Inbox, _Mailbox

    async def main():
        box = _Mailbox(asyncio.get_running_loop())
        deliver, wakeups = box._deliver, []
        box._deliver = lambda: (wakeups.append(1), deliver())
        inboxes = [_Inbox() for _ in range(8)]

        def scheduler():
            for step in range(300):
                for inbox in inboxes:
                    box.post(inbox, step)

        thread = threading.Thread(target=scheduler)
        thread.start()
        got = [[] for _ in inboxes]
        for events, inbox in zip(got, inboxes):
            while len(events) < 300:
                events.extend(await inbox.take())
        thread.join()
        assert got == [list(range(300))] * len(inboxes)
        assert len(wakeups) < 300 * len(inboxes) / 4, len(wakeups)
        for event in ("a", "b", "c"):
            box.post(inboxes[0], event)
        assert await inboxes[0].take() == ["a", "b", "c"]

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


TOOL_QUESTIONS = ["Where is my lord?", "Question number 1: what say you?", "Tell me a story", "How many are we?",
                  "Good morrow, cousin."]
TOOL_MAX_TOKENS = [40, 25, 33, 40, 30]


def stand_in_tools(monkeypatch, *engines) -> None:
    """The tiny model never writes a real tool call: two tokens it often emits stand in for <|python_start|>
    and <|python_end|>, and the calculator answers "7"."""
    from nanochat.inference import tools
    monkeypatch.setattr(tools, "calculate", lambda expr: "7")
    for engine in engines:
        engine.tools.python_start, engine.tools.python_end = 57, 283


def serve_greedy(worker, prompts: list[list[int]], max_tokens: list[int], together: bool) -> list[list[int]]:
    """Each prompt's streamed tokens at temperature 0: submitted all at once, or one after the other."""
    from nanochat.web.scheduler import GenerationRequest

    streams, finished = [[] for _ in prompts], threading.Semaphore(0)

    def emit(event, tokens):
        if event[0] == "token":
            tokens.append(event[2])
        else:  # "done", or "error": the comparison fails on a short stream
            finished.release()

    for prompt, n, tokens in zip(prompts, max_tokens, streams):
        worker.submit(GenerationRequest(prompt=prompt, emit=functools.partial(emit, tokens=tokens),
                                        max_tokens=n, temperature=0.0))
        if not together:
            assert finished.acquire(timeout=120)
    if together:
        assert all(finished.acquire(timeout=120) for _ in prompts)
    return streams


def test_scheduler_streams_engine_generate_tokens_with_forced_tool_output(monkeypatch):
    """Greedy requests served together (more than there are slots, so some join while others decode)
    stream exactly Engine.generate's tokens, also through calculator calls: the scheduler feeds each
    step's samples to the next step before the host sees them, and a token the tool forces must replace
    the sample in time."""
    from nanochat.conversation import render_for_completion
    from nanochat.inference.engine import Engine
    from nanochat.web.scheduler import BatchScheduler
    from tests.helpers_chat import tiny_model, tiny_tokenizer

    model, tok = tiny_model(sequence_len=512), tiny_tokenizer()
    reference, worker = Engine(model, tok), BatchScheduler(model, tok, slots=3)
    stand_in_tools(monkeypatch, reference, worker.engine)
    prompts = [render_for_completion(tok, {"messages": [{"role": "user", "content": q}]}) for q in TOOL_QUESTIONS]
    expected, tool_calls = [], 0
    for prompt, n in zip(prompts, TOOL_MAX_TOKENS):
        seqs, masks = reference.generate_batch(prompt, max_tokens=n, temperature=0.0)
        expected.append(seqs[0][len(prompt):])
        tool_calls += 0 in masks[0][len(prompt):]
    assert tool_calls >= 2, "the stand-in tool tokens no longer occur: the test would not force anything"
    try:
        assert serve_greedy(worker, prompts, TOOL_MAX_TOKENS, together=True) == expected
    finally:
        worker.close()


def test_requests_admitted_together_are_prefilled_as_one_batch(monkeypatch):
    """Prompts of different lengths queued before the scheduler looks are admitted in one round and
    prefilled as one right-padded batch (two batches under a smaller prefill_tokens): each greedy stream,
    both samples of an n=2 request too, equals Engine.generate's for its prompt alone, so no padding
    leaked into a prompt's cache, position or first logits; a bad prompt in the batch fails alone."""
    from nanochat.conversation import render_for_completion
    from nanochat.inference.engine import Engine
    from nanochat.web.scheduler import BatchScheduler, GenerationRequest
    from tests.helpers_chat import tiny_model, tiny_tokenizer

    model, tok = tiny_model(sequence_len=512), tiny_tokenizer()
    reference = Engine(model, tok)
    prompts = [render_for_completion(tok, {"messages": [{"role": "user", "content": q}]}) for q in TOOL_QUESTIONS]
    prompts[2] = prompts[2][:5]
    for i in range(len(prompts)):  # lengths all different, whatever the tokenizer (its text differs without ../shared)
        while len(prompts[i]) in map(len, prompts[:i]):
            prompts[i] = prompts[i][:-1]
    expected = [reference.generate_batch(p, max_tokens=n, temperature=0.0)[0][0][len(p):]
                for p, n in zip(prompts, TOOL_MAX_TOKENS)]
    # the bad prompt (1 token longer than prompts[1]) is third: its batch fails, then runs one request at a time
    three = 3 * max(map(len, prompts)) + 3  # room for 3 prompts per batch
    for prefill_tokens, want_batches in ((8192, [6, 1, 1, 1, 1, 1, 1]), (three, [3, 1, 1, 1, 3])):
        worker = BatchScheduler(model, tok, slots=8, prefill_tokens=prefill_tokens)
        batches, prefill_batch = [], worker.engine.prefill_batch
        monkeypatch.setattr(worker.engine, "prefill_batch", lambda ps: (batches.append(len(ps)), prefill_batch(ps))[1])
        streams, errors, finished = {}, [], threading.Semaphore(0)

        def emit(event, i):
            if event[0] == "token":
                streams.setdefault((i, event[1]), []).append(event[2])
            else:
                errors.extend([event] if event[0] == "error" else [])
                finished.release()

        bad = prompts[1][:3] + [10 ** 6] + prompts[1][3:]  # a token past the vocab: the embedding raises
        requests = [GenerationRequest(prompt=p, emit=functools.partial(emit, i=i), max_tokens=n, temperature=0.0,
                                      num_samples=2 if i == 3 else 1)
                    for i, (p, n) in enumerate(zip(prompts, TOOL_MAX_TOKENS))]
        requests.insert(2, GenerationRequest(prompt=bad, emit=functools.partial(emit, i=-1), max_tokens=5))
        with worker.pending.mutex:  # all queued at once, so that one _admit takes them all
            worker.pending.queue.extend(requests)
            worker.pending.not_empty.notify()
        try:
            assert all(finished.acquire(timeout=120) for _ in range(len(prompts) + 2))  # n=2: two "done"
        finally:
            worker.close()
        assert batches == want_batches
        assert len(errors) == 1 and "IndexError" in errors[0][2], errors
        assert sorted(streams) == sorted([(i, 0) for i in range(len(prompts))] + [(3, 1)])
        for (i, _), tokens in streams.items():
            assert tokens == expected[i], i


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_scheduler_on_the_gpu_streams_the_same_tokens_alone_and_together(monkeypatch):
    """On CUDA, compiled and replayed as a CUDA graph, each step's tokens coming back through pinned memory
    while the next step runs: greedy requests with forced tool output stream the same tokens together as
    alone. The reference is the same worker on the torch attention path, whose rows are computed apart
    (Engine.generate's batch-1 bf16 matmuls, or a kernel that splits work by the longest row, may round
    otherwise)."""
    from nanochat.conversation import render_for_completion
    from nanochat.web.scheduler import BatchScheduler
    from tests.helpers_chat import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    worker = BatchScheduler(tiny_model(sequence_len=512).cuda(), tok, slots=3, compile=True, attention="torch")
    stand_in_tools(monkeypatch, worker.engine)
    prompts = [render_for_completion(tok, {"messages": [{"role": "user", "content": q}]}) for q in TOOL_QUESTIONS]
    try:
        alone = serve_greedy(worker, prompts, TOOL_MAX_TOKENS, together=False)
        assert serve_greedy(worker, prompts, TOOL_MAX_TOKENS, together=True) == alone
    finally:
        worker.close()
    assert any(tok.encode_special("<|output_start|>") in tokens for tokens in alone), "no tool output forced"


def test_web_host_runs_on_a_stand_in_device(capsys):
    """benchmarks.web_host with --stub_step_ms: the stand-in device wraps the scheduler's step and its
    wait for the step's tokens, so a renamed scheduler method breaks this, not a GPU session."""
    from benchmarks import web_host
    web_host.main(["--clients", "1,2", "--duration_s", "0.3", "--max_tokens", "4", "--stub_step_ms", "1"])
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert [r["clients"] for r in rows] == [1, 2] and all(r["tokens_per_s"] > 0 for r in rows), rows
    assert all(r["step_ms"] >= 1.0 for r in rows), rows  # the stand-in device's steps do not overlap
