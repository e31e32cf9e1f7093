"""Engine: greedy decoding equals full recomputation, sampling is seeded, stops, and the calculator tool."""
import random
import re
import shutil

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from nanochat.conversation import render_for_completion
from nanochat.inference import engine as engine_mod
from nanochat.inference.decoder import StaticDecoder, resolve_decode_attention
from nanochat.inference.engine import Engine, TextStream
from nanochat.inference.sampling import sample_next
from nanochat.model.gpt import GPT, config_from_depth
from tests.helpers_chat import byte_tokenizer, naive_generate, needs_triton_interpreter, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=["L", "SL"])
def model(request):
    return tiny_model(window_pattern=request.param)


def prompts(tok):
    return [
        [tok.get_bos_token_id()],
        tok.encode("To be, or not to be", prepend="<|bos|>"),
        render_for_completion(tok, {"messages": [{"role": "user", "content": "Where is my lord?"}]}),
        tok.encode("First Citizen: We are accounted poor citizens, the patricians good. " * 2, prepend="<|bos|>"),
    ]


def stops(tok):
    return {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}


def test_greedy_equals_naive(tok, model):
    """At temperature 0 the cached engine must pick exactly the tokens of a no-cache recomputation
    (with the sliding-window model, generations run past the 16-token window)."""
    eng = Engine(model, tok)
    longest = 0
    for prompt in prompts(tok):
        expected = naive_generate(model, prompt, max_tokens=40, stop_ids=stops(tok))
        longest = max(longest, len(expected) - len(prompt))
        seqs, masks = eng.generate_batch(prompt, num_samples=2, max_tokens=40, temperature=0.0)
        assert seqs[0] == expected and seqs[1] == expected
        assert masks[0] == [0] * len(prompt) + [1] * (len(expected) - len(prompt))
    assert longest >= 20, "the random model stops at once: the comparison would be vacuous"


@pytest.mark.parametrize("fuse_qkv,attention", [(False, "torch"), (True, "torch"),
                                                 pytest.param(True, "triton", marks=needs_triton_interpreter),
                                                 pytest.param(True, "triton_dot", marks=needs_triton_interpreter)])
def test_static_decoder_rows_at_different_positions(tok, model, fuse_qkv, attention):
    """Continuous batching: slots holding different prompts step together, each at its own position
    (q/k/v as three matmuls or one; attention masked in torch or by the decode kernel, which the
    CPU runs in Triton's interpreter; the "SL" model's window is shorter than the generations)."""
    eng = Engine(model, tok)
    ps = prompts(tok)[1:]
    dec = StaticDecoder(model, slots=len(ps), max_seq_len=128, fuse_qkv=fuse_qkv, attention=attention)
    logits = []
    for slot, p in enumerate(ps):
        lg, cache = eng.prefill(p)
        dec.load_prompt([slot], cache)
        logits.append(lg[0])
    seqs = [list(p) for p in ps]
    with torch.inference_mode():
        for _ in range(12):
            nxt = torch.stack(logits).argmax(-1)
            for s, t in zip(seqs, nxt.tolist()):
                s.append(t)
            dec.tokens.copy_(nxt)
            logits = list(dec.step())
    for p, s in zip(ps, seqs):
        assert s == naive_generate(model, p, max_tokens=12, stop_ids=set())


def test_decoder_step_logits_equal_the_full_forward(tok, model):
    """Logits, not only greedy picks: the prefill's and each decode step's equal the model's full forward over the
    sequence so far (RECIPE's options on: what a step reads of the token before it, the smear's embedding and the
    bigram table's row, must be what the full forward reads)."""
    eng = Engine(model, tok)
    ps = prompts(tok)[1:]
    dec = StaticDecoder(model, slots=len(ps), max_seq_len=128, fuse_qkv=True)
    seqs, logits = [list(p) for p in ps], []
    for slot, p in enumerate(ps):
        lg, cache = eng.prefill(p)
        dec.load_prompt([slot], cache)
        logits.append(lg[0])
    logits = torch.stack(logits)
    with torch.inference_mode():
        for _ in range(6):
            for seq, got in zip(seqs, logits):
                torch.testing.assert_close(got, model(torch.tensor([seq]))[0, -1], atol=1e-4, rtol=0)
            nxt = logits.argmax(-1)
            for seq, token in zip(seqs, nxt.tolist()):
                seq.append(token)
            dec.tokens.copy_(nxt)
            logits = dec.step().clone()  # step() hands back a buffer that the next step overwrites


def test_step_outside_graph_is_the_same_step(tok, model):
    """The profiler's entry point computes what step() does and advances the positions the same way."""
    eng = Engine(model, tok)
    _, cache = eng.prefill(prompts(tok)[0])
    decoders = [StaticDecoder(model, slots=2, max_seq_len=64) for _ in range(2)]
    with torch.inference_mode():
        for dec in decoders:
            dec.load_prompt([0, 1], cache)
            dec.tokens.fill_(5)
        a, b = decoders[0].step().clone(), decoders[1].step_outside_graph()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(decoders[0].pos, decoders[1].pos) and int(decoders[1].pos[0]) == cache.pos + 1


def lockstep_logit_gaps(eng, ps, want_dec, got_dec, steps: int) -> list[float]:
    """Prompt i prefilled into slot i of both decoders, then both stepped on the same tokens (want_dec's
    greedy picks): per step, the largest logit gap relative to want_dec's largest |logit|."""
    logits = []
    for slot, p in enumerate(ps):
        lg, cache = eng.prefill(p)
        for dec in (want_dec, got_dec):
            dec.load_prompt([slot], cache)
        logits.append(lg[0])
    nxt, gaps = torch.stack(logits).argmax(-1), []
    with torch.inference_mode():
        for _ in range(steps):
            for dec in (want_dec, got_dec):
                dec.tokens.copy_(nxt)
            want, got = want_dec.step().clone(), got_dec.step()
            gaps.append(((got - want).abs().max() / want.abs().max()).item())
            nxt = want.argmax(-1)
    return gaps


@needs_triton_interpreter
@pytest.mark.parametrize("attention", ["triton", "triton_dot"])
def test_fp8_kv_cache_stays_close_to_bf16_exact_decode(tok, model, attention):
    """kv_fp8 stores keys and values in e4m3 with a scale per vector: not exact, so the logits are
    compared, step by step on the same tokens, with the exact decoder's (tolerance in the assert)."""
    ps = prompts(tok)[1:]
    exact = StaticDecoder(model, slots=len(ps), max_seq_len=128, attention="torch")
    fp8 = StaticDecoder(model, slots=len(ps), max_seq_len=128, attention=attention, kv_fp8=True)
    assert fp8.k[0].dtype == torch.float8_e4m3fn
    gaps = lockstep_logit_gaps(Engine(model, tok), ps, exact, fp8, steps=8)
    assert max(gaps) <= 0.015, gaps  # measured <= 0.8%; a 10% scale error: 2.2%


def shared_prompt_gaps(eng, prompt, copies, shared, steps: int) -> list[float]:
    """`copies` holds the prompt in every slot (load_prompt), `shared` once (load_shared_prompt); both
    stepped on the same tokens, rows different from the first step on (copies' greedy picks after that):
    per step, the largest logit gap relative to copies' largest |logit|."""
    _, cache = eng.prefill(prompt)
    copies.load_prompt(list(range(copies.slots)), cache)
    shared.load_shared_prompt(cache)
    nxt, gaps = torch.arange(5, 5 + copies.slots), []
    with torch.inference_mode():
        for _ in range(steps):
            for dec in (copies, shared):
                dec.tokens.copy_(nxt)
            want, got = copies.step().clone(), shared.step()
            gaps.append(((got.cpu() - want.cpu()).abs().max() / want.abs().max()).item())
            nxt = want.argmax(-1)
    return gaps


@pytest.mark.parametrize("attention,kv_fp8,tol", [
    ("torch", False, 1e-5),
    pytest.param("triton", False, 1e-5, marks=needs_triton_interpreter),
    pytest.param("triton_dot", False, 1e-5, marks=needs_triton_interpreter),
    pytest.param("triton", True, 0.015, marks=needs_triton_interpreter),  # e4m3 rows: as the fp8 test above
])
def test_shared_prompt_decoder_matches_a_copy_per_row(tok, model, attention, kv_fp8, tol):
    """A prompt stored once and attended by every row (merged with each row's own keys by log-sum-exp)
    gives the logits of a decoder holding a copy per row; 20 steps past the prompt also take the "SL"
    model's 16-token window past it (its short-window layers then see none of the prompt)."""
    prompt = prompts(tok)[3]
    assert len(prompt) > 16
    n = len(prompt) + 24
    copies = StaticDecoder(model, slots=3, max_seq_len=n, attention="torch")
    shared = StaticDecoder(model, slots=3, max_seq_len=n, attention=attention, kv_fp8=kv_fp8,
                           shared_prompt_len=len(prompt))
    assert shared.k[0].size(2) == 24  # rows hold only their own positions
    gaps = shared_prompt_gaps(Engine(model, tok), prompt, copies, shared, steps=20)
    assert max(gaps) <= tol, gaps


def test_shared_prompt_arguments(tok, model):
    eng = Engine(model, tok)
    _, cache = eng.prefill(prompts(tok)[1])
    with pytest.raises(ValueError, match="shared_prompt_len must be"):
        StaticDecoder(model, slots=2, max_seq_len=16, shared_prompt_len=16)
    shared = StaticDecoder(model, slots=2, max_seq_len=64, shared_prompt_len=cache.pos)
    with pytest.raises(ValueError, match="load_shared_prompt"):
        shared.load_prompt([0], cache)
    with pytest.raises(ValueError, match=f"batch-1 cache of {cache.pos + 1} positions"):
        StaticDecoder(model, slots=2, max_seq_len=64, shared_prompt_len=cache.pos + 1).load_shared_prompt(cache)
    with pytest.raises(ValueError, match="use load_prompt"):
        StaticDecoder(model, slots=2, max_seq_len=64).load_shared_prompt(cache)


def test_decoder_attention_arguments(model):
    with pytest.raises(ValueError, match="unknown decode attention 'flash'; choose one of: auto, triton_dot, triton, torch"):
        StaticDecoder(model, slots=1, max_seq_len=16, attention="flash")
    with pytest.raises(ValueError, match="attention='triton'"):
        StaticDecoder(model, slots=1, max_seq_len=16, kv_fp8=True)  # auto on the CPU is the torch path
    assert StaticDecoder(model, slots=1, max_seq_len=16).attention == "torch"


def test_auto_decode_attention_picks_the_kernel_on_cuda():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_decode_attention("auto", cuda, 128, kv_fp8=False) == "triton_dot"
    assert resolve_decode_attention("auto", cuda, 128, kv_fp8=True) == "triton"
    assert resolve_decode_attention("auto", cuda, 96, kv_fp8=False) == "torch"  # tiles need 2^k
    assert resolve_decode_attention("auto", cpu, 128, kv_fp8=False) == "torch"
    assert resolve_decode_attention("triton", cpu, 96, kv_fp8=False) == "triton"  # asked for: as is


def test_stacked_qkv_weights_follow_the_model():
    """A decoder kept across generations (compiled, cached by the engine) must decode with the model's
    current weights after training changed them in place: load_prompt refreshes the stacked copies."""
    model = tiny_model()
    tok = tiny_tokenizer()
    prompt = tok.encode("To be, or not to be", prepend="<|bos|>")
    eng = Engine(model, tok)
    kept = StaticDecoder(model, slots=1, max_seq_len=64, fuse_qkv=True)
    with torch.no_grad():
        for block in model.blocks:  # an optimizer step, in place
            block.attn.c_k.weight.mul_(-1.5)
            block.attn.c_v.weight.add_(0.05)
    fresh = StaticDecoder(model, slots=1, max_seq_len=64, fuse_qkv=False)
    _, cache = eng.prefill(prompt)
    with torch.inference_mode():
        for dec in (kept, fresh):
            dec.load_prompt([0], cache)
            dec.tokens.fill_(7)
        torch.testing.assert_close(kept.step(), fresh.step(), rtol=1e-5, atol=1e-5)


def test_stacked_qkv_weights_are_not_restacked_while_unchanged(monkeypatch):
    """A server loads a prompt per request and never trains: load_prompt restacks only after a weight changed."""
    from nanochat.model.gpt import CausalSelfAttention
    model, tok = tiny_model(), tiny_tokenizer()
    decoder = StaticDecoder(model, slots=2, max_seq_len=64, fuse_qkv=True)
    stacked = []
    real = CausalSelfAttention.qkv_weight
    monkeypatch.setattr(CausalSelfAttention, "qkv_weight", lambda self, out=None: stacked.append(1) or real(self, out))
    _, cache = Engine(model, tok).prefill(tok.encode("Hello", prepend="<|bos|>"))
    with torch.inference_mode():
        decoder.load_prompt([0], cache)
        decoder.load_prompt([1], cache)
    assert stacked == []
    with torch.no_grad():
        model.blocks[0].attn.c_q.weight.add_(0.01)
    with torch.inference_mode():
        decoder.load_prompt([0], cache)
    assert len(stacked) == len(model.blocks)


def test_sampling_differs_across_samples_and_is_seeded(tok, model):
    eng = Engine(model, tok)
    prompt = prompts(tok)[1]
    a, _ = eng.generate_batch(prompt, num_samples=4, max_tokens=20, temperature=1.0, seed=1)
    b, _ = eng.generate_batch(prompt, num_samples=4, max_tokens=20, temperature=1.0, seed=1)
    c, _ = eng.generate_batch(prompt, num_samples=4, max_tokens=20, temperature=1.0, seed=2)
    assert a == b
    assert len({tuple(s) for s in a}) > 1
    assert a != c


def test_hashed_exp_noise_is_exp1_per_row_and_depends_on_key_and_position_only():
    from nanochat.inference.sampling import hashed_exp_noise

    keys, positions = torch.tensor([7, 7, 8, -3]), torch.tensor([100, 101, 100, 5])
    noise = hashed_exp_noise(keys, positions, 50_000)
    # a row is the same drawn alone or among others; every (key, position) gives another row
    torch.testing.assert_close(hashed_exp_noise(keys[2:3], positions[2:3], 50_000), noise[2:3], rtol=0, atol=0)
    assert len({tuple(r[:8].tolist()) for r in noise}) == 4
    # Exp(1): mean 1 and P(E > 1) = 1/e, each within ~5 standard errors of 200k draws
    assert abs(noise.mean().item() - 1) < 0.012 and abs((noise > 1).float().mean().item() - 0.3679) < 0.006
    assert noise.min() > 0 and torch.isfinite(noise).all()


def test_sample_next_top_k_top_p():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0, 1.0]]).repeat(2000, 1)
    picked = sample_next(logits, gen, temperature=1.0, top_k=2)
    assert set(picked.tolist()) == {1, 2}
    # top_p=0.5: token 1 alone holds < 0.5 of the mass, tokens 1+2 exceed it -> exactly {1, 2}
    picked = sample_next(logits, gen, temperature=1.0, top_p=0.5)
    assert set(picked.tolist()) == {1, 2}
    picked = sample_next(logits, gen, temperature=1.0, top_p=0.01)
    assert set(picked.tolist()) == {1}
    assert sample_next(logits[:3], None, temperature=0.0).tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, gen, temperature=-1.0)


def test_sample_next_draws_what_multinomial_draws():
    """sample_next is torch.multinomial's own draw minus its input checks: the same tokens from one seed."""
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(1)) * 3
    ours, theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(20):
        want = torch.multinomial(torch.softmax(logits / 0.7, dim=-1), 1, generator=theirs)[:, 0]
        assert torch.equal(sample_next(logits, ours, temperature=0.7), want)


class CountingTokenizer:
    """A tokenizer that counts the tokens it is asked to decode."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def token_piece(self, token):
        self.decoded += 1
        return self.tok.token_piece(token)


def test_text_stream_holds_split_characters_and_adds_up_to_the_full_decode():
    """With one token per byte every non-ASCII character is split across tokens: add() holds it back
    until its last byte, and the pieces (finish() included) equal the full decode, invalid bytes too.
    Each token is decoded once, however long the reply."""
    tok = byte_tokenizer()
    stream = TextStream(tok)
    assert [stream.add(b) for b in tok.encode("日")] == ["", "", "日"]
    text = "naïve café — 日本語 🙂 ok"
    stream = TextStream(tok)
    assert "".join(stream.add(t) for t in tok.encode(text)) == text and stream.finish() == ""
    cut = TextStream(tok)  # ends inside 🙂: its first two bytes come out as U+FFFD only at the end
    assert "".join(cut.add(t) for t in tok.encode(text)[:-5]) == text[:-4] and cut.finish() == "\ufffd"
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.choice([rng.randrange(256), *tok.encode("é日🙂")]) for _ in range(rng.randrange(40))]
        stream = TextStream(tok)
        assert "".join(stream.add(t) for t in ids) + stream.finish() == tok.decode(ids)
    counting = CountingTokenizer(tok)
    stream = TextStream(counting)
    for t in tok.encode(text * 100):
        stream.add(t)
    assert counting.decoded == len(tok.encode(text * 100))


class ScriptedSampler:
    """Replaces sample_next: row 0 'emits' the given script, then <|assistant_end|>."""

    def __init__(self, script):
        self.script, self.calls = list(script), 0

    def __call__(self, logits, generator, temperature, top_k, top_p):
        tok = self.script[self.calls] if self.calls < len(self.script) else self.script[-1]
        self.calls += 1
        return torch.full((logits.size(0),), tok, dtype=torch.long)


def test_stop_on_assistant_end(tok, model, monkeypatch):
    end = tok.encode_special("<|assistant_end|>")
    word = tok.encode("hi")
    monkeypatch.setattr(engine_mod, "sample_next", ScriptedSampler(word + [end]))
    steps = list(Engine(model, tok).generate(prompts(tok)[1], num_samples=2, max_tokens=30))
    assert [col[0] for col, _ in steps] == word + [end]


def test_tool_call_forces_calculator_output(tok, model, monkeypatch):
    sp = tok.encode_special
    expr = tok.encode("2+2")
    tail = tok.encode(" so")
    script = [sp("<|python_start|>"), *expr, sp("<|python_end|>")]
    # while the engine forces the output, the sampler keeps proposing junk that must be ignored
    junk = tok.encode("zzzz")[:1] * 3
    monkeypatch.setattr(engine_mod, "sample_next",
                        ScriptedSampler(script + junk + tail + [sp("<|assistant_end|>")]))
    prompt = prompts(tok)[2]
    seqs, masks = Engine(model, tok).generate_batch(prompt, max_tokens=40)
    gen, gmask = seqs[0][len(prompt):], masks[0][len(prompt):]
    forced = [sp("<|output_start|>"), *tok.encode("4"), sp("<|output_end|>")]
    assert len(forced) == 3
    assert gen == script + forced + tail
    assert gmask == [1] * len(script) + [0] * len(forced) + [1] * len(tail)


def test_refused_tool_call_forces_nothing(tok, model, monkeypatch):
    sp = tok.encode_special
    script = [sp("<|python_start|>"), *tok.encode("__import__('os')"), sp("<|python_end|>")]
    monkeypatch.setattr(engine_mod, "sample_next", ScriptedSampler(script + [sp("<|assistant_end|>")]))
    seqs, masks = Engine(model, tok).generate_batch(prompts(tok)[2], max_tokens=40)
    assert seqs[0][len(prompts(tok)[2]):] == script


def test_bad_arguments(tok, model):
    eng = Engine(model, tok)
    with pytest.raises(ValueError, match="empty"):
        list(eng.generate([], max_tokens=3))
    with pytest.raises(ValueError, match="context"):
        list(eng.generate([1] * 300, max_tokens=3))
    # the cap keeps prompt + generation inside the context
    seqs, _ = eng.generate_batch([tok.get_bos_token_id()] * 250, max_tokens=50, temperature=0.0)
    assert len(seqs[0]) <= 256


def decode_greedily(dec: StaticDecoder, logits: torch.Tensor, seqs: list[list[int]], steps: int) -> list[list[int]]:
    """`steps` greedy decode steps of every slot of `dec` from `logits`, appending each slot's token to its sequence."""
    for _ in range(steps):
        nxt = logits.argmax(-1)
        for seq, token in zip(seqs, nxt.tolist()):
            seq.append(token)
        dec.tokens.copy_(nxt)
        logits = dec.step()
    return seqs


def test_load_prompt_row_by_row(tok, model):
    """A batch-2 prefill copied into two slots decodes like each prompt alone."""
    from nanochat.model.gpt import KVCache

    ps = [tok.encode("O Romeo, Romeo", prepend="<|bos|>"), tok.encode("Now is the winter", prepend="<|bos|>")]
    n = min(map(len, ps))
    ps = [p[:n] for p in ps]
    cfg = model.config
    cache = KVCache(2, cfg.n_layer, cfg.n_kv_head, cfg.head_dim, n)
    with torch.inference_mode():
        logits = model(torch.tensor(ps), kv_cache=cache)[:, -1]
        dec = StaticDecoder(model, slots=2, max_seq_len=n + 8)
        dec.load_prompt([0, 1], cache)
        seqs = decode_greedily(dec, logits, [list(p) for p in ps], steps=6)
    for p, s in zip(ps, seqs):
        assert s == naive_generate(model, p, max_tokens=6, stop_ids=set())


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("gcc") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_decode_step_writes_the_kv_cache_in_place():
    """A compiled decode step must write each new key/value into the cache in place. A functionalized
    write into a slice of a shared cache tensor shows up in Inductor's code as a loop over a whole layer's
    cache (that many elements), and made the d20 decode step ~20x slower on the H200 (BENCHMARKS.md)."""
    torch.manual_seed(0)
    cfg = config_from_depth(1, vocab_size=256, sequence_len=32, aspect_ratio=64, head_dim=64)
    gpt = GPT(cfg)
    gpt.init_weights()
    gpt.eval()
    eager, compiled = (StaticDecoder(gpt, slots=3, max_seq_len=80, compile=c) for c in (False, True))
    for dec in (eager, compiled):
        dec.tokens.copy_(torch.tensor([5, 6, 7]))
        dec.pos.copy_(torch.tensor([0, 4, 9]))
    with torch.no_grad():
        want = eager.step().clone()
        got, codes = run_and_get_code(compiled._step_fn)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled.k[0], eager.k[0])
    layer_numel = compiled.k[0].numel()  # 3 slots x 1 kv head x 80 positions x 64 = 15360, unique here
    loop_bounds = set(re.findall(r"<static_cast<int64_t>\((\d+)L\)", "\n".join(codes)))
    assert loop_bounds and str(layer_numel) not in loop_bounds, sorted(loop_bounds, key=int)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("gcc") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
@needs_triton_interpreter
def test_compiled_decode_step_with_the_decode_kernel():
    """The decode kernel inside a compiled step (a custom op, opaque to the compiler) computes what the
    eager torch path does, rows at different positions."""
    torch.manual_seed(0)
    cfg = config_from_depth(1, vocab_size=256, sequence_len=32, aspect_ratio=64, head_dim=64)
    gpt = GPT(cfg)
    gpt.init_weights()
    with torch.no_grad():
        for p in gpt.parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * 0.1)
    gpt.eval()
    eager = StaticDecoder(gpt, slots=3, max_seq_len=80)
    compiled = StaticDecoder(gpt, slots=3, max_seq_len=80, compile=True, attention="triton")
    for dec in (eager, compiled):
        dec.tokens.copy_(torch.tensor([5, 6, 7]))
        dec.pos.copy_(torch.tensor([0, 4, 9]))
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(compiled.step(), eager.step(), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention,kv_fp8,tol", [("triton", False, 0.01), ("triton_dot", False, 0.01),
                                                   ("triton", True, 0.015), ("triton_dot", True, 0.015)])
def test_decode_kernels_follow_the_torch_path_on_the_gpu(tok, attention, kv_fp8, tol):
    """On CUDA, compiled with a CUDA graph: each decode kernel's steps give the masked torch path's logits on
    the same tokens, rows at different positions, past the "SL" model's window. bf16 caches: rounding only;
    fp8 caches: as the CPU's fp8 test."""
    model = tiny_model(window_pattern="SL").cuda()
    ps = prompts(tok)[1:]
    torch_path = StaticDecoder(model, slots=len(ps), max_seq_len=128, compile=True, attention="torch")
    kernel = StaticDecoder(model, slots=len(ps), max_seq_len=128, compile=True, attention=attention, kv_fp8=kv_fp8)
    gaps = lockstep_logit_gaps(Engine(model, tok), ps, torch_path, kernel, steps=40)
    assert max(gaps) <= tol, gaps


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention", ["triton", "triton_dot"])
def test_shared_prompt_decoder_on_the_gpu(tok, attention):
    """Compiled with a CUDA graph on bf16 caches: the shared-prompt decoder follows a copy-per-row decoder
    (the torch path), past the "SL" model's window."""
    model = tiny_model(window_pattern="SL").cuda()
    prompt = prompts(tok)[3]
    n = len(prompt) + 48
    copies = StaticDecoder(model, slots=4, max_seq_len=n, compile=True, attention="torch")
    shared = StaticDecoder(model, slots=4, max_seq_len=n, compile=True, attention=attention,
                           shared_prompt_len=len(prompt))
    gaps = shared_prompt_gaps(Engine(model, tok), prompt, copies, shared, steps=40)
    assert max(gaps) <= 0.01, gaps  # both bf16 caches: rounding only


def test_prefill_batch_equals_each_prompt_prefilled_alone(tok, model):
    """Right-padded batched prefill: each row's last logits and its cache positions equal the prompt's batch-1
    prefill, which has no padding (padding after a prompt must not leak into it), and the lengths are the
    prompts'. (Batch-1 prefill against the model's own full forward: the engine-vs-naive tests.)"""
    eng = Engine(model, tok)
    ps = prompts(tok)
    assert len(set(map(len, ps))) == len(ps) and max(map(len, ps)) > 16  # past the "SL" model's window
    with torch.inference_mode():
        logits, cache, lengths = eng.prefill_batch(ps)
        assert lengths.tolist() == [len(p) for p in ps] and cache.pos == max(map(len, ps))
        for row, p in enumerate(ps):
            want_logits, want = eng.prefill(p)
            n = len(p)
            torch.testing.assert_close(logits[row], want_logits[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(cache.k[:, row, :n], want.k[:, 0, :n], atol=1e-5, rtol=0)
            torch.testing.assert_close(cache.v[:, row, :n], want.v[:, 0, :n], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="empty"):
        eng.prefill_batch([ps[1], []])


@pytest.mark.parametrize("attention", ["torch", pytest.param("triton", marks=needs_triton_interpreter)])
def test_load_prompt_from_a_padded_batch_decodes_each_prompt_alone(tok, model, attention):
    """A batched prefill of prompts of different lengths, each row loaded at its own length (one row into
    two slots, as n=2 samples), decodes greedily like each prompt alone: the padded positions past a
    row's length are never attended to before decoding overwrites them."""
    eng = Engine(model, tok)
    ps = prompts(tok)[1:]
    rows_of_slots = [2, 0, 1, 0]  # slot -> prompt
    with torch.inference_mode():
        logits, cache, lengths = eng.prefill_batch(ps)
        dec = StaticDecoder(model, slots=5, max_seq_len=max(map(len, ps)) + 12, fuse_qkv=True, attention=attention)
        rows = torch.tensor(rows_of_slots)
        dec.load_prompt([3, 0, 4, 1], cache, rows=rows, lengths=lengths[rows])
        assert dec.pos.tolist() == [len(ps[0]), len(ps[0]), 0, len(ps[2]), len(ps[1])]
        logits = logits[torch.tensor([0, 0, 0, 2, 1])]  # slot 2 is unused: any logits
        seqs = decode_greedily(dec, logits, [list(ps[r]) for r in (0, 0, 0, 2, 1)], steps=10)
    for slot, r in ((0, 0), (1, 0), (3, 2), (4, 1)):
        assert seqs[slot] == naive_generate(model, ps[r], max_tokens=10, stop_ids=set()), slot
