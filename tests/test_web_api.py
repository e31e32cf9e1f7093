"""The API's fields and routes, through the official `openai` client over real HTTP (loopback): stop,
stream_options.include_usage, logprobs, model, refused fields, the error shape, /v1/models/{id},
/v1/completions, /metrics and the API key."""
import codecs
import json
import threading

import httpx
import pytest
import torch

from tests.helpers_chat import LiveServer, naive_generate, tiny_model, tiny_tokenizer

openai = pytest.importorskip("openai")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402  (a dependency of the web extra)

MESSAGES = [{"role": "user", "content": "Hello there, who are you?"}]


@pytest.fixture(scope="module")
def server():
    """Every answer runs to max_tokens (no end-of-turn token): its length is known."""
    srv = LiveServer(slots=8, max_tokens=64)
    srv.worker.engine.tools.stop_ids = set()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference():
    """Greedy tokens and log-probabilities from full forwards of the same tiny model (no cache)."""
    model = tiny_model(sequence_len=512)

    def run(prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
        seq = naive_generate(model, prompt, n, stop_ids=set())
        with torch.inference_mode():
            logits = model(torch.tensor([seq]))[0].float()
        logp = torch.log_softmax(logits[len(prompt) - 1:len(seq) - 1], dim=-1)
        return seq[len(prompt):], logp
    return run


def chat_prompt() -> list[int]:
    from nanochat.conversation import render_for_completion
    return render_for_completion(tiny_tokenizer(), {"messages": MESSAGES})


def greedy(client, **kw):
    return client.chat.completions.create(model="nanochat", messages=MESSAGES, temperature=0, **kw)


def collect(stream) -> tuple[list[str], list, list]:
    """(text per choice, finish reason per choice, chunks) of a streamed chat completion."""
    texts, finish, chunks = {}, {}, list(stream)
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            finish[c.index] = c.finish_reason or finish.get(c.index)
    return [texts[i] for i in sorted(texts)], [finish[i] for i in sorted(finish)], chunks


# ---- stop ---------------------------------------------------------------------------------------

def test_stop_text_holds_back_what_may_start_a_stop_string():
    from nanochat.web.choice import StopText
    stop = StopText(["\n\nUser:", "END"])
    assert stop.feed("Hello\n") == ("Hello", False)      # "\n" may begin "\n\nUser:"
    assert stop.feed("\nUs") == ("", False)
    assert stop.feed("ed to it") == ("\n\nUsed to it", False)  # a false start is released whole
    assert stop.feed(" E") == (" ", False)
    assert stop.feed("NDING") == ("", True)              # "END" spans two pieces: cut before it
    stop = StopText(["\n\nUser:"])
    assert stop.feed("a\n\nU") == ("a", False) and stop.flush() == "\n\nU"


def test_stop_cuts_the_answer_streaming_or_not(client):
    full = greedy(client, max_tokens=24).choices[0].message.content
    stop = full[9:13]  # spans tokens: the tiny vocabulary's tokens are a few characters long
    expected = full[:full.index(stop)]
    r = greedy(client, max_tokens=24, stop=[stop, "never in this text \x00"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 24
    texts, finish, _ = collect(greedy(client, max_tokens=24, stop=stop, stream=True))
    assert texts == [expected] and finish == ["stop"]


def test_stop_ends_each_sample_on_its_own(client, server):
    """n=2, seeded: a stop string found in sample 0's text alone ends sample 0; sample 1 runs to
    max_tokens with the text it has without the stop string."""
    kw = dict(model="nanochat", messages=MESSAGES, max_tokens=30, temperature=1.0, n=2, seed=11)
    free = client.chat.completions.create(**kw)
    a, b = (c.message.content for c in free.choices)
    stop = next(a[i:i + 3] for i in range(4, len(a) - 3) if a[i:i + 3] not in b)
    r = client.chat.completions.create(**kw, stop=stop)
    assert r.choices[0].message.content == a[:a.index(stop)] and r.choices[0].finish_reason == "stop"
    assert r.choices[1].message.content == b and r.choices[1].finish_reason == "length"


def test_scheduler_frees_a_stopped_sample_at_once():
    """A sample index added to `stopped` frees that sample's slot at the next step; the others go on."""
    from nanochat.web.scheduler import BatchScheduler, GenerationRequest
    tok = tiny_tokenizer()
    worker = BatchScheduler(tiny_model(sequence_len=512), tok, slots=2)
    worker.engine.tools.stop_ids = set()
    tokens, done = {0: [], 1: []}, threading.Event()
    req = GenerationRequest(prompt=chat_prompt(), emit=lambda e: None, num_samples=2, max_tokens=40, temperature=0.0)

    def emit(event):
        if event[0] == "token":
            tokens[event[1]].append(event[2])
            if event[1] == 0 and len(tokens[0]) == 2:
                req.stopped.add(0)
        elif event[0] == "done" or event[0] == "error":
            done.set()

    req.emit = emit
    try:
        worker.submit(req)
        assert done.wait(60)
    finally:
        worker.close()
    assert len(tokens[1]) == 40 and 2 <= len(tokens[0]) <= 4, {k: len(v) for k, v in tokens.items()}


def test_top_p_zero_is_greedy(client):
    """top_p 0 keeps only the likeliest token (the sampler reads 0 as "off": the server maps it to greedy)."""
    want = greedy(client, max_tokens=12).choices[0].message.content
    r = client.chat.completions.create(model="nanochat", messages=MESSAGES, max_tokens=12, temperature=1.0,
                                       top_p=0, seed=5)
    assert r.choices[0].message.content == want


# ---- include_usage ------------------------------------------------------------------------------

def test_include_usage_adds_a_last_chunk_with_the_usage(client):
    plain = greedy(client, max_tokens=7)
    _, _, chunks = collect(greedy(client, max_tokens=7, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1])
    _, _, chunks = collect(greedy(client, max_tokens=7, stream=True))
    assert all(c.usage is None for c in chunks) and chunks[-1].choices


def test_stream_options_without_stream_is_refused(client):
    with pytest.raises(openai.BadRequestError) as err:
        greedy(client, max_tokens=2, stream_options={"include_usage": True})
    assert err.value.param == "stream_options"


# ---- logprobs -----------------------------------------------------------------------------------

def test_chat_logprobs_are_the_models(client, reference):
    """Each token's logprob and its 3 likeliest alternatives equal a full forward's log-softmax; the
    streamed entries equal the answer's."""
    tokens, logp = reference(chat_prompt(), 10)
    tok = tiny_tokenizer()
    r = greedy(client, max_tokens=10, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert [bytes(e.bytes) for e in content] == [tok.token_piece(t) for t in tokens]
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == r.choices[0].message.content
    for j, entry in enumerate(content):
        assert entry.logprob == pytest.approx(logp[j, tokens[j]].item(), abs=1e-3)
        top = logp[j].topk(3)
        assert [bytes(a.bytes) for a in entry.top_logprobs] == [tok.token_piece(t) for t in top.indices.tolist()]
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-3)
    _, _, chunks = collect(greedy(client, max_tokens=10, logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    assert greedy(client, max_tokens=3).choices[0].logprobs is None


def test_logprobs_without_top_and_top_without_logprobs(client):
    r = greedy(client, max_tokens=4, logprobs=True)
    assert len(r.choices[0].logprobs.content) == 4 and all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)
    with pytest.raises(openai.BadRequestError) as err:
        greedy(client, max_tokens=4, top_logprobs=2)
    assert err.value.param == "top_logprobs"


# ---- model, refused fields, errors ----------------------------------------------------------------

def test_unknown_model_is_404_in_openai_shape(client, server):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4", messages=MESSAGES, max_tokens=2)
    assert err.value.code == "model_not_found" and err.value.param == "model" and "gpt-4" in err.value.message
    assert client.models.retrieve("nanochat").id == "nanochat"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}, timeout=30)
    assert r.status_code == 200 and r.json()["model"] == "nanochat"  # no model: the server's own


@pytest.mark.parametrize("fields, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logit_bias": {"17": 5}}, "logit_bias"),
    ({"extra_body": {"frobnicate": True}}, "frobnicate"),
    ({"extra_body": {"stream_options": {"include_usage": True, "x": 1}}, "stream": True}, "stream_options.x"),
])
def test_what_is_not_served_is_refused_naming_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as err:
        greedy(client, max_tokens=2, **fields)
    assert err.value.param == param and param.split(".")[-1] in err.value.message


def test_defaults_of_unserved_fields_and_labels_are_accepted(client):
    r = greedy(client, max_tokens=2, tools=[], presence_penalty=0, frequency_penalty=0.0, logit_bias={},
               response_format={"type": "text"}, user="someone", metadata={"k": "v"}, store=False)
    assert r.usage.completion_tokens == 2


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/v2/nothing", 404), ("GET", "/v1/chat/completions", 405), ("DELETE", "/v1/models", 405),
    ("GET", "/v1/models/gpt-4", 404), ("POST", "/v1/completions", 400)])
def test_every_error_has_the_openai_shape(server, method, path, status):
    r = httpx.request(method, server.url + path, timeout=30)
    assert r.status_code == status
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text


# ---- /v1/completions ----------------------------------------------------------------------------

def test_completions_continue_plain_text(client, reference):
    tok = tiny_tokenizer()
    prompt = "First Citizen:\nBefore we proceed"
    tokens, logp = reference(tok.encode(prompt, prepend="<|bos|>"), 8)
    r = client.completions.create(model="nanochat", prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    choice = r.choices[0]
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert choice.text == tok.decode(tokens) and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode(prompt)) + 1 and r.usage.completion_tokens == 8
    lp = choice.logprobs
    assert lp.token_logprobs == pytest.approx([logp[j, t].item() for j, t in enumerate(tokens)], abs=1e-3)
    assert lp.tokens == [tok.token_piece(t).decode("utf-8", "replace") for t in tokens]
    # the legacy format maps each alternative's text to its logprob: two tokens that decode alike (bytes of one
    # character, each shown as U+FFFD) share one key
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs) and any(len(top) == 2 for top in lp.top_logprobs)
    # each offset: the characters of the text decoded before the token (a character split across tokens
    # counts once it is whole)
    utf8, decoded, offsets = codecs.getincrementaldecoder("utf-8")(errors="replace"), 0, []
    for t in tokens:
        offsets.append(decoded)
        decoded += len(utf8.decode(tok.token_piece(t)))
    assert lp.text_offset == offsets
    stream = client.completions.create(model="nanochat", prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage.completion_tokens == 8


def test_completions_stop_and_refusals(client):
    prompt = "First Citizen:\nBefore we proceed"
    text = client.completions.create(model="nanochat", prompt=prompt, max_tokens=16, temperature=0).choices[0].text
    stop = text[5:8]
    r = client.completions.create(model="nanochat", prompt=prompt, max_tokens=16, temperature=0, stop=stop)
    assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"
    for kw, param in (({"echo": True}, "echo"), ({"prompt": ["a", "b"]}, "prompt"), ({"suffix": "x"}, "suffix")):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(**{"model": "nanochat", "prompt": prompt, "max_tokens": 2, **kw})
        assert err.value.param == param


# ---- /metrics -----------------------------------------------------------------------------------

def scrape(server) -> dict:
    """{(name, labels as a sorted tuple): value} of every sample."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_requests_tokens_latency_and_slots(client, server):
    before = scrape(server)
    r = greedy(client, max_tokens=5)
    with pytest.raises(openai.BadRequestError):
        greedy(client, max_tokens=5, tools=[{"type": "function"}])
    after = scrape(server)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    route = "/v1/chat/completions"
    assert grew("nanochat_requests_total", route=route, status="200") == 1
    assert grew("nanochat_requests_total", route=route, status="400") == 1
    assert grew("nanochat_request_duration_seconds_count", route=route) == 2
    assert grew("nanochat_prompt_tokens_total") == r.usage.prompt_tokens
    assert grew("nanochat_completion_tokens_total") == 5
    assert grew("nanochat_time_to_first_token_seconds_count") == 1
    assert after[("nanochat_slots", (("worker", "0"),))] == 8
    assert after[("nanochat_slots_active", (("worker", "0"),))] == 0
    assert after[("nanochat_queued_requests", (("worker", "0"),))] == 0


# ---- the API key --------------------------------------------------------------------------------

def test_api_key_guards_the_api_and_metrics():
    srv = LiveServer(slots=2, max_tokens=8, app={"api_key": "sekret", "model_name": "nanochat-sft"})
    try:
        bad = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError) as err:
            bad.chat.completions.create(model="nanochat-sft", messages=MESSAGES, max_tokens=2)
        assert err.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="sekret", max_retries=0, timeout=60)
        assert good.chat.completions.create(model="nanochat-sft", messages=MESSAGES, max_tokens=2).usage
        assert [m.id for m in good.models.list().data] == ["nanochat-sft"]
        assert httpx.get(f"{srv.url}/metrics", timeout=10).status_code == 401
        key = {"Authorization": "Bearer sekret"}
        assert httpx.get(f"{srv.url}/metrics", headers=key, timeout=10).status_code == 200
        assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200  # for load balancers
        assert httpx.get(f"{srv.url}/", timeout=10).status_code == 200        # the page asks for the key
    finally:
        srv.close()


def test_failed_generation_errors_have_the_openai_shape(server, monkeypatch):
    """A generation that fails answers 500 (not streaming), or ends its stream with an error event, in
    the same shape."""
    def broken(prompts):
        raise RuntimeError("boom")
    monkeypatch.setattr(server.worker.engine, "prefill_batch", broken)
    body = {"messages": MESSAGES, "max_tokens": 4}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error" and "boom" in r.text
    body["stream"] = True
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    err = events[-1]["error"]
    assert set(err) == {"message", "type", "param", "code"} and "boom" in err["message"]
    assert err["type"] == "server_error"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_scheduler_logprobs_match_the_tokens_fed(device):
    """Greedy requests with logprobs (k=3, k=0) beside one without: each token is its entry's top
    alternative with the same logprob (so the entry belongs to that token's step, also through the
    asynchronous copies on CUDA), and asking for logprobs changes no token."""
    from nanochat.web.scheduler import BatchScheduler, GenerationRequest
    tok = tiny_tokenizer()
    worker = BatchScheduler(tiny_model(sequence_len=512).to(device), tok, slots=4, compile=device == "cuda")
    worker.engine.tools.stop_ids = set()
    events, finished = {0: [], 1: [], 2: []}, threading.Semaphore(0)

    def emit(event, r):
        events[r].append(event)
        if event[0] in ("done", "error"):
            finished.release()

    try:
        for r, k in enumerate([3, None, 0]):
            worker.submit(GenerationRequest(prompt=chat_prompt(), emit=lambda e, r=r: emit(e, r), max_tokens=12,
                                            temperature=0.0, logprobs=k))
        assert all(finished.acquire(timeout=120) for _ in range(3))
    finally:
        worker.close()
    tokens = {r: [e[2] for e in ev if e[0] == "token"] for r, ev in events.items()}
    assert tokens[0] == tokens[1] == tokens[2] and len(tokens[0]) == 12
    assert not any(e[0] == "logprob" for e in events[1])
    for r, k in ((0, 3), (2, 0)):
        pairs = [(a[2], b[2]) for a, b in zip(events[r], events[r][1:]) if a[0] == "logprob" and b[0] == "token"]
        assert len(pairs) == 12
        for (logprob, top), token in pairs:
            assert logprob <= 0 and len(top) == k
            if k:
                assert top[0][0] == token and top[0][1] == pytest.approx(logprob)
                assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
