"""CORE scoring with oracle models: gold-oracle -> centered 1.0, random logits -> centered ~ 0."""
from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch

from helpers_dist import spawn_gloo
from nanochat.eval import core_eval
from nanochat.eval.core_eval import build_pairs, evaluate_core, evaluate_task, sample_fewshot, tokenize_pair
from tests.helpers_chat import byte_tokenizer, needs_data

TOK = byte_tokenizer()
V = TOK.get_vocab_size()


def gold_sequences(task) -> set[tuple[int, ...]]:
    """Token ids of every item's correct (context, continuation) pair, built independently of the scorer's
    batching: an oracle 'knows' these and predicts them perfectly."""
    gold = set()
    meta = task.meta
    for idx in range(len(task.items)):
        item = task.items[idx]
        pairs = build_pairs(item, meta, sample_fewshot(task.items, idx, meta["num_fewshot"]))
        pair = pairs[0] if meta["task_type"] == "language_modeling" else pairs[int(item["gold"])]
        gold.add(tuple(tokenize_pair(TOK, *pair)[0]))
    return gold


def gold_oracle(gold: set[tuple[int, ...]]):
    """Perfect next-token prediction on gold sequences, uniform logits elsewhere."""
    bos = TOK.get_bos_token_id()

    def model_fn(ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(ids.shape[0], ids.shape[1], V)
        for r, row in enumerate(ids.tolist()):
            end = len(row)
            while end > 1 and row[end - 1] == bos:
                end -= 1
            if tuple(row[:end]) in gold:
                logits[r, torch.arange(end - 1), torch.tensor(row[1:end])] = 20.0
        return logits
    return model_fn


def random_model(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return lambda ids: torch.randn(ids.shape[0], ids.shape[1], V, generator=gen)


@pytest.fixture(scope="module")
def core_tasks():
    from nanochat.tasks.core_tasks import load_core_tasks
    return {t.label: t for t in load_core_tasks()}


def test_fewshot_sampling_deterministic():
    items = [{"query": f"q{i}", "choices": ["a", "b"], "gold": i % 2} for i in range(30)]
    for idx in (0, 7, 29):
        shots = sample_fewshot(items, idx, 5)
        assert shots == sample_fewshot(items, idx, 5) and len(shots) == 5
        assert items[idx] not in shots and len({s["query"] for s in shots}) == 5
    assert sample_fewshot(items, 3, 5) != sample_fewshot(items, 4, 5)
    assert sorted(s["query"] for s in sample_fewshot(items[:3], 0, 10)) == ["q1", "q2"]  # k capped at n - 1
    assert sample_fewshot(items, 0, 0) == []


def test_prompt_layouts():
    mc = {"query": "Q: sky?", "choices": ["blue", "green"], "gold": 0}
    shot = {"query": "Q: grass?", "choices": ["red", "green"], "gold": 1}
    meta = {"task_type": "multiple_choice", "continuation_delimiter": "\nAnswer: ", "num_fewshot": 1}
    assert build_pairs(mc, meta, [shot]) == [("Q: grass?\nAnswer: green\n\nQ: sky?\nAnswer: ", "blue"),
                                             ("Q: grass?\nAnswer: green\n\nQ: sky?\nAnswer: ", "green")]
    schema = {"context_options": ["Ann ate because Ann", "Ann ate because Bob"], "continuation": "was hungry.", "gold": 0}
    meta = {"task_type": "schema", "continuation_delimiter": " ", "num_fewshot": 0}
    assert build_pairs(schema, meta, []) == [("Ann ate because Ann ", "was hungry."), ("Ann ate because Bob ", "was hungry.")]
    lm = {"context": "2+2=", "continuation": "4"}
    meta = {"task_type": "language_modeling", "continuation_delimiter": "", "num_fewshot": 1}
    assert build_pairs(lm, meta, [{"context": "1+1=", "continuation": "2"}]) == [("1+1=2\n\n2+2=", "4")]


def test_tokenize_pair_moves_space_and_crops():
    ids, start = tokenize_pair(TOK, "The capital of France is ", "Paris")
    assert ids[0] == TOK.get_bos_token_id() and TOK.decode(ids[start:]) == " Paris"
    assert TOK.decode(ids[1:start]) == "The capital of France is"
    ids, start = tokenize_pair(TOK, "x" * 100 + " ", "abc", max_seq_len=20)
    assert len(ids) == 20 and TOK.decode(ids[start:]) == " abc"
    with pytest.raises(ValueError, match="max_seq_len"):
        tokenize_pair(TOK, "a", "b" * 30, max_seq_len=10)


@needs_data
@pytest.mark.parametrize("label", ["arc_easy", "copa", "winograd", "bigbench_operators", "hellaswag"])
def test_gold_oracle_scores_one(core_tasks, label):
    task = core_tasks[label]
    n = 24
    order = list(range(len(task.items)))
    random.Random(core_eval.SUBSET_SEED).shuffle(order)
    small = replace(task, items=[task.items[i] for i in sorted(order[:200])])  # fewer items: a cheap oracle
    res = evaluate_task(gold_oracle(gold_sequences(small)), TOK, small.items, small.meta, batch_size=6,
                        max_per_task=n)
    assert res == {"accuracy": 1.0, "n": n}


@needs_data
@pytest.mark.parametrize("label", ["arc_easy", "piqa", "winogrande"])
def test_random_model_is_near_chance(core_tasks, label):
    task = core_tasks[label]
    seed = random.randrange(10**9)
    n = 200
    res = evaluate_task(random_model(seed), TOK, task.items, {**task.meta, "num_fewshot": 0}, batch_size=16,
                        max_per_task=n)
    b = task.random_baseline
    centered = (res["accuracy"] - b) / (1 - b)
    tol = 4.5 * math.sqrt(b * (1 - b) / n) / (1 - b)
    assert abs(centered) < tol, (seed, res)


@needs_data
def test_evaluate_core_mean(core_tasks):
    picked = []
    for label in ("boolq", "lambada_openai", "openbook_qa"):
        t = core_tasks[label]
        order = list(range(len(t.items)))
        random.Random(core_eval.SUBSET_SEED).shuffle(order)
        picked.append(replace(t, items=[t.items[i] for i in sorted(order[:60])]))
    gold = set().union(*(gold_sequences(t) for t in picked))
    out = evaluate_core(None, TOK, tasks=picked, model_fn=gold_oracle(gold), max_per_task=10, batch_size=8)
    assert set(out["tasks"]) == {"boolq", "lambada_openai", "openbook_qa"}
    assert out["core"] == pytest.approx(1.0) and out["tasks"]["boolq"]["random_baseline"] == 0.62
    assert all(r["n"] == 10 for r in out["tasks"].values())
    # a model that is right on nothing: LM accuracy 0 -> centered 0 exactly; MC below chance -> negative
    out = evaluate_core(None, TOK, tasks=picked[1:2], model_fn=lambda ids: torch.zeros(*ids.shape, V), max_per_task=10)
    assert out["core"] == 0.0


@needs_data
def test_core_task_table(core_tasks):
    assert len(core_tasks) == 19
    assert core_tasks["arc_challenge"].num_fewshot == 3
    assert core_tasks["jeopardy"].continuation_delimiter == "\nAnswer: "
    assert core_tasks["winograd"].task_type == "schema" and core_tasks["winograd"].random_baseline == 0.5
    assert core_tasks["lambada_openai"].random_baseline == 0.0
    assert core_tasks["copa"].random_baseline == 0.5 and core_tasks["arc_easy"].random_baseline == 0.25


def test_bpb_matches_manual():
    from nanochat.eval.bpb import evaluate_bpb
    torch.manual_seed(0)
    token_bytes = torch.tensor([0, 1, 2, 3, 0], dtype=torch.int32)  # ids 0 and 4 are "special"

    class Fake:
        def __call__(self, x, y, loss_reduction="none"):
            assert loss_reduction == "none"
            return (x.float() + 1.0) * 0.5  # a deterministic "loss" per position

    batches = [(torch.randint(0, 5, (2, 6)), torch.randint(0, 5, (2, 6))) for _ in range(3)]
    batches[0][1][0, 0] = -1  # an ignored target
    nats = nbytes = 0.0
    for x, y in batches:
        for xi, yi in zip(x.flatten().tolist(), y.flatten().tolist()):
            b = token_bytes[yi].item() if yi >= 0 else 0
            if b:
                nats += (xi + 1.0) * 0.5
                nbytes += b
    assert evaluate_bpb(Fake(), batches, 3, token_bytes) == pytest.approx(nats / math.log(2) / nbytes)
    with pytest.raises(ValueError):
        evaluate_bpb(Fake(), batches, 0, token_bytes)


# ---- chat evaluation runner -----------------------------------------------------------------------

@needs_data
def test_chat_categorical_oracle_and_random():
    from nanochat.conversation import render_for_completion
    from nanochat.eval.chat_eval import load_task, run_categorical
    task = load_task("ARC-Easy")
    n = 60
    gold_letter = {tuple(render_for_completion(TOK, task[i])): TOK.encode(task[i]["messages"][-1]["content"])[0]
                   for i in range(n)}

    def oracle(ids):  # knows each prompt's gold letter, and reads it at the prompt's last real token
        logits = torch.randn(ids.shape[0], ids.shape[1], V)
        for r, row in enumerate(ids.tolist()):
            for length in range(len(row), 0, -1):
                if tuple(row[:length]) in gold_letter:
                    logits[r, length - 1, gold_letter[tuple(row[:length])]] = 50.0
                    break
        return logits

    assert run_categorical(None, TOK, task, "cpu", batch_size=7, max_problems=n, model_fn=oracle) == \
        {"accuracy": 1.0, "n": n}
    seed = random.randrange(10**9)
    gen = torch.Generator().manual_seed(seed)
    res = run_categorical(None, TOK, task, "cpu", batch_size=16, max_problems=300,
                          model_fn=lambda ids: torch.randn(ids.shape[0], ids.shape[1], V, generator=gen))
    assert abs((res["accuracy"] - 0.25) / 0.75) < 4.5 * math.sqrt(0.25 * 0.75 / 300) / 0.75, seed


@needs_data
def test_chat_generative_with_reference_engine():
    """An 'engine' that answers with the reference solution scores 1.0; a wrong one 0.0."""
    from nanochat.eval.chat_eval import chat_core, load_task, run_generative
    task = load_task("GSM8K")

    class ReferenceEngine:
        def __init__(self, wrong=False):
            self.wrong, self.index = wrong, None

        def generate_batch(self, tokens, num_samples=1, **kw):
            conv = task[self.index]
            text = "".join(p["text"] for p in conv["messages"][-1]["content"])
            if self.wrong:
                text = "#### 123456789"
            return [tokens + TOK.encode(text)] * num_samples, None

    engine = ReferenceEngine()
    real_getitem = type(task).__getitem__

    class Tracking(type(task)):
        def __getitem__(self, i):
            engine.index = i
            return real_getitem(self, i)

    task.__class__ = Tracking
    assert run_generative(engine, TOK, task, "cpu", num_samples=2, max_problems=12) == {"accuracy": 1.0, "n": 12}
    engine.wrong = True
    assert run_generative(engine, TOK, task, "cpu", max_problems=12)["accuracy"] == 0.0
    assert chat_core({"ARC-Easy": 0.25, "GSM8K": 0.0}) == 0.0
    assert chat_core({"MMLU": 1.0, "HumanEval": 1.0}) == 1.0


@needs_data
def test_eval_scripts_end_to_end(tmp_path, monkeypatch, capsys):
    """Both scripts on a tiny random checkpoint: they run, write report sections, end with JSON."""
    import json

    from helpers_chat import tiny_model, tiny_tokenizer
    from nanochat.checkpoint import save_checkpoint
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tok = tiny_tokenizer()
    tok.save(tmp_path / "tokenizer")
    model = tiny_model(sequence_len=256)
    from dataclasses import asdict
    meta = {"model_config": asdict(model.config), "train_config": {}, "loader_state": {},
            "tokenizer_dir": str(tmp_path / "tokenizer")}
    for phase in ("base", "sft"):
        save_checkpoint(tmp_path / "checkpoints" / phase / "d2", 5, model.state_dict(), None, {**meta, "step": 5})

    from scripts import base_eval, chat_eval
    base_eval.main(["--eval=core,sample", "--max_per_task=2", "--core_tasks=copa,winograd,lambada_openai",
                    "--device_type=cpu"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert -1.0 <= out["core"] <= 1.0 and len(out["core_tasks"]) == 3 and len(out["samples"]) == 7
    chat_eval.main(["-i", "sft", "-a", "ARC-Easy,GSM8K,HumanEval", "-x", "2", "-m", "8", "--device_type=cpu"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"ARC-Easy", "GSM8K", "HumanEval", "ChatCORE"} <= set(out)
    assert (tmp_path / "report" / "base_eval.json").is_file() and (tmp_path / "report" / "chat_eval_sft.json").is_file()

    # a checkpoint directory given by path, outside the base dir, with its own tokenizer
    save_checkpoint(tmp_path / "usb" / "run", 9, model.state_dict(), None, {**meta, "step": 9},
                    tokenizer_dir=tmp_path / "tokenizer")
    base_eval.main(["--eval=core", "--max_per_task=2", "--core_tasks=copa,winograd,lambada_openai",
                    "--device_type=cpu", "--model", str(tmp_path / "usb" / "run")])
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["step"] == 9
    chat_eval.main(["-i", "sft", "-a", "ARC-Easy,GSM8K", "-x", "2", "-m", "8", "--device_type=cpu",
                    "--model", str(tmp_path / "usb" / "run" / "step_000009")])
    captured_chat = capsys.readouterr()
    assert json.loads(captured_chat.out.strip().splitlines()[-1])["step"] == 9
    # progress bars over what really runs, as whole lines in a log (stderr is not a terminal here)
    err = captured.err + captured_chat.err
    assert "\r" not in err
    assert any(line.startswith("CORE: 100%") and "6/6" in line for line in err.splitlines())
    assert any(line.startswith("GSM8K: 100%") and "2/2" in line for line in err.splitlines())


def _items(n: int = 11) -> list[dict]:
    rng = random.Random(5)
    return [{"query": f"q{i} {rng.random():.3f}:", "choices": [f"c{j}{rng.randint(0, 9)}" for j in range(3)],
             "gold": rng.randrange(3)} for i in range(n)]


def _hash_model(ids: torch.Tensor) -> torch.Tensor:
    """Deterministic logits that depend on the input (the same in every process)."""
    return torch.nn.functional.one_hot((ids * 7 + ids.roll(1, dims=1) * 3) % V, V).float()


def _rank_eval(rank: int, world_size: int, out: str) -> None:
    meta = {"task_type": "multiple_choice", "num_fewshot": 2, "continuation_delimiter": " "}
    res = evaluate_task(_hash_model, TOK, _items(), meta, batch_size=4)
    torch.save(res, f"{out}.{rank}")


def test_two_ranks_split_items_and_sum_counts(tmp_path):
    """Under torch.distributed each rank scores its share and the counts add up to the one-process result."""
    meta = {"task_type": "multiple_choice", "num_fewshot": 2, "continuation_delimiter": " "}
    single = evaluate_task(_hash_model, TOK, _items(), meta, batch_size=4)
    assert single["n"] == 11
    spawn_gloo(_rank_eval, 2, str(tmp_path / "res"))
    for rank in range(2):
        assert torch.load(tmp_path / f"res.{rank}") == single
