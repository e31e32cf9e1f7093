"""Tasks: rendering of real items, scoring with known answers, GSM8K parsing, mixtures, SmolTalk."""
from __future__ import annotations

import json
import random

import pytest

from nanochat.tasks.base import Task, centered, resolve_data_root
from nanochat.tasks.gsm8k import GSM8K, answer_parts, extract_answer
from nanochat.tasks.mixture import TaskMixture
from tests.helpers_chat import DATA, byte_tokenizer, needs_data

# ---- GSM8K -------------------------------------------------------------------------------------

def test_gsm8k_tool_call_parts():
    parts = answer_parts("He pays 3 * 4 = $<<3*4=12>>12.\nThen <<12/2=6>>6 left.\n#### 6")
    assert parts == [{"type": "text", "text": "He pays 3 * 4 = $"}, {"type": "python", "text": "3*4"},
                     {"type": "python_output", "text": "12"}, {"type": "text", "text": "12.\nThen "},
                     {"type": "python", "text": "12/2"}, {"type": "python_output", "text": "6"},
                     {"type": "text", "text": "6 left.\n#### 6"}]
    assert answer_parts("no tools here\n#### 3") == [{"type": "text", "text": "no tools here\n#### 3"}]


@pytest.mark.parametrize("completion, expected", [
    ("so the answer is\n#### 42", 42.0), ("#### 1,234", 1234.0), ("It costs $18.", 18.0), ("#### -7", -7.0),
    ("3 apples and 5 pears, so 8", 8.0), ("#### 3.50", 3.5), ("####42", 42.0), ("no number", None),
    ("first 10 then #### 12 and later 99", 12.0), ("x = .5", 0.5)])
def test_gsm8k_answer_parsing(completion, expected):
    assert extract_answer(completion) == expected


@needs_data
def test_gsm8k_real_items_and_scoring():
    task = GSM8K("test")
    assert len(task) == 1319 and len(GSM8K("train")) == 7473
    conv = task[0]
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    parts = conv["messages"][1]["content"]
    assert {"type": "python", "text": "16-3-4"} in parts and {"type": "python_output", "text": "9"} in parts
    assert parts[-1]["text"].endswith("#### 18")
    assert task.evaluate(conv, "blah\n#### 18") == 1 and task.evaluate(conv, "She makes 18 dollars") == 1
    assert task.evaluate(conv, "#### 18.0") == 1 and task.evaluate(conv, "#### 17") == 0
    assert task.evaluate(conv, "#### 18 but maybe 17") == 1  # the number right after #### decides
    # the reference reply (parts joined) is scored correct on every item of a slice
    for conv in GSM8K("test", start=0, stop=200):
        reply = "".join(p["text"] for p in conv["messages"][1]["content"])
        assert task.evaluate(conv, reply) == 1


# ---- categorical tasks ----------------------------------------------------------------------------

def _oracle_and_random(task, n, rng):
    gold = sum(task.evaluate(task[i], task[i]["messages"][-1]["content"]) for i in range(n)) / n
    rand = sum(task.evaluate(task[i], rng.choice(task[i]["letters"])) for i in range(n)) / n
    return gold, rand


@needs_data
@pytest.mark.parametrize("name", ["ARC-Easy", "ARC-Challenge", "MMLU"])
def test_categorical_tasks(name):
    from nanochat.eval.chat_eval import BASELINES, load_task
    task = load_task(name)
    assert task.eval_type == "categorical"
    assert len(task) == {"ARC-Easy": 2376, "ARC-Challenge": 1172, "MMLU": 14079}[name]
    conv = task[0]
    user = conv["messages"][0]["content"]
    assert conv["letters"] == ["A", "B", "C", "D"] and "\nA. " in user and "\nD. " in user
    assert conv["messages"][1]["content"] in "ABCD" and not user.startswith("Question:")
    seed = random.randrange(10**9)
    n = 400
    gold, rand = _oracle_and_random(task, n, random.Random(seed))
    assert centered(gold, BASELINES[name]) == 1.0
    tol = 4.5 * (0.25 * 0.75 / n) ** 0.5 / 0.75  # 4.5 sigma of a centered binomial mean
    assert abs(centered(rand, BASELINES[name])) < tol, (seed, rand)


@needs_data
def test_arc_gold_letters_match_source():
    from nanochat.tasks.arc import ARC
    task = ARC("ARC-Challenge")
    rows = [json.loads(line) for line in open(DATA / "eval/core/world_knowledge/arc_challenge.jsonl")][:50]
    for i, row in enumerate(rows):
        conv = task[i]
        letter = conv["messages"][1]["content"]
        assert "ABCD".index(letter) == row["gold"]
        assert f"\n{letter}. {row['choices'][row['gold']]}\n" in conv["messages"][0]["content"]


@needs_data
def test_mmlu_first_anatomy_item():
    from nanochat.tasks.mmlu import MMLU
    task = MMLU("test", subjects=["anatomy"])
    conv = task[0]
    assert conv["subject"] == "anatomy" and conv["messages"][1]["content"] == "A"
    assert "stylomastoid foramen" in conv["messages"][0]["content"]
    with pytest.raises(ValueError, match="unknown MMLU subjects"):
        MMLU("test", subjects=["astrology"])


@needs_data
def test_hellaswag_items():
    from nanochat.tasks.hellaswag import HellaSwag, load_hellaswag
    items = load_hellaswag()
    assert len(items) == 10042
    assert items[0]["query"].startswith("Roof shingle removal: A man is sitting on a roof.")
    assert items[0]["gold"] == 3 and items[0]["choices"][3] == "starts pulling up roofing on a roof."
    assert all(len(it["choices"]) == 4 for it in items)
    conv = HellaSwag()[0]
    assert conv["messages"][1]["content"] == "D"


# ---- HumanEval -------------------------------------------------------------------------------------

@needs_data
def test_humaneval_prompt_and_canonical_solutions():
    from nanochat.tasks.humaneval import HumanEval, build_solution
    task = HumanEval(stop=4)
    assert len(task) == 4 and len(HumanEval()) == 164
    conv = task[0]
    assert conv["messages"][0]["content"].startswith("from typing import List\n\n\ndef has_close_elements(")
    assert conv["entry_point"] == "has_close_elements"
    body = task.rows[0]["canonical_solution"]
    solution = build_solution(conv["prompt"], body, conv["entry_point"])
    assert solution.startswith(conv["prompt"]) and "check(" not in solution  # the tests stay out of its reach
    for conv in task:  # the reference reply (prompt + canonical body) passes its tests
        assert task.evaluate(conv, conv["messages"][1]["content"]) == 1
    first = task[0]
    assert task.evaluate(first, task.rows[0]["canonical_solution"]) == 1  # body only: the prompt goes in front
    assert task.evaluate(first, "Here you go:\n```python\n" + first["messages"][1]["content"] + "```\n") == 1
    assert task.evaluate(first, "    return False\n") == 0


# ---- SFT sets, mixtures --------------------------------------------------------------------------

@needs_data
def test_sft_local_sets():
    from nanochat.tasks.sft_local import FastChatConversations, GPTeacher
    train, val = GPTeacher("train"), GPTeacher("val")
    assert len(train) + len(val) == len(GPTeacher("all")) > 14000 and 0 < len(val) < len(train) // 20
    conv = GPTeacher("all", files=["codegen-instruct.json"])[0]
    assert conv["messages"][0]["content"].startswith("Write a C++ program") and "width: 5" in conv["messages"][0]["content"]
    assert conv["messages"][1]["content"].startswith("#include <iostream>")
    fc = FastChatConversations("all")
    assert len(fc) == 500 and fc.skipped == 0
    roles = [m["role"] for m in fc[0]["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert fc[0]["messages"][0]["content"] == "Who are you?"


@needs_data
def test_sft_examples_render():
    from nanochat.conversation import render_conversation
    from nanochat.tasks.mixture import sft_mixture
    tok = byte_tokenizer()
    mix = sft_mixture("val")
    for i in range(0, len(mix), max(1, len(mix) // 40)):
        ids, mask = render_conversation(tok, mix[i], max_tokens=100_000)
        assert len(ids) == len(mask) and sum(mask) > 0


def _tiny_sft_root(root):
    """A data root whose local SFT sets are too small to have a held-out slice, and a 2+2 row GSM8K."""
    (root / "sft" / "gpteacher").mkdir(parents=True)
    (root / "eval" / "gsm8k").mkdir(parents=True)
    rows = [{"instruction": f"Say {i}.", "input": "", "response": str(i)} for i in range(3)]
    (root / "sft" / "gpteacher" / "a.json").write_text(json.dumps(rows))
    convs = [{"id": str(i), "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": f"Hello {i}"}]}
             for i in range(3)]
    (root / "sft" / "fastchat_dummy_conversation.json").write_text(json.dumps(convs))
    for split in ("train", "test"):
        lines = [json.dumps({"question": f"{split} {i}?", "answer": f"<<1+{i}={1 + i}>>\n#### {1 + i}"}) for i in range(2)]
        (root / "eval" / "gsm8k" / f"{split}.jsonl").write_text("\n".join(lines))
    return root


def test_sft_mixture_parts_and_smoltalk_cap(tmp_path):
    from nanochat.tasks.mixture import sft_mixture
    root = _tiny_sft_root(tmp_path / "data")
    val = sft_mixture("val", data_root=root)  # both local held-out slices are empty: left out, not an error
    assert sorted(x["messages"][0]["content"] for x in val) == ["test 0?", "test 1?"]
    chats = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(4)]
    _write_smoltalk(tmp_path / "smol.parquet", chats)
    train = sft_mixture("train", data_root=root, smoltalk=str(tmp_path / "smol.parquet"), smoltalk_examples=3)
    users = [x["messages"][0]["content"] for x in train]
    assert len(train) == 3 + 3 + 2 + 3 and sorted(u for u in users if u.startswith("q")) == ["q0", "q1", "q2"]
    everything = sft_mixture("train", data_root=root, smoltalk=str(tmp_path / "smol.parquet"), smoltalk_examples=-1)
    assert len(everything) == 3 + 3 + 2 + 4
    assert len(sft_mixture("val", data_root=root, smoltalk=str(tmp_path / "smol.parquet"))) == 2 + 4


class Numbers(Task):
    def __init__(self, n, tag, **kw):
        super().__init__(**kw)
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [], "id": (self.tag, index)}


def test_task_slicing():
    t = Numbers(10, "a", start=2, stop=9, step=3)
    assert [x["id"][1] for x in t] == [2, 5, 8] and len(t) == 3 and t[-1]["id"] == ("a", 8)
    with pytest.raises(IndexError):
        t[3]
    with pytest.raises(ValueError):
        Numbers(10, "a", start=5, stop=2)


def test_mixture_deterministic_and_sized():
    a, b = Numbers(5, "a"), Numbers(3, "b")
    mix = TaskMixture([a, (b, 7)], seed=3)
    ids = [x["id"] for x in mix]
    assert len(mix) == 12 and ids == [x["id"] for x in TaskMixture([a, (b, 7)], seed=3)]
    assert ids != [x["id"] for x in TaskMixture([a, (b, 7)], seed=4)]
    assert sorted(i for t, i in ids if t == "a") == [0, 1, 2, 3, 4]
    assert sorted(i for t, i in ids if t == "b") == [0, 0, 0, 1, 1, 2, 2]  # oversampled cyclically


# ---- SmolTalk -----------------------------------------------------------------------------------

def _write_smoltalk(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    msg = pa.struct([("content", pa.string()), ("role", pa.string())])
    table = pa.table({"messages": pa.array(rows, type=pa.list_(msg)), "source": ["t"] * len(rows)})
    pq.write_table(table, path)


def test_smoltalk_local_parquet(tmp_path):
    from nanochat.tasks.smoltalk import SmolTalk
    rows = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
             {"role": "assistant", "content": "6"}],
            [{"role": "assistant", "content": "I start?"}, {"role": "user", "content": "no"}]]
    path = tmp_path / "train-0000.parquet"
    _write_smoltalk(path, rows)
    task = SmolTalk("train", path=path)
    assert len(task) == 2 and task.skipped == 1
    assert task[1]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert task[1]["messages"][-1] == {"role": "assistant", "content": "6"}
    with pytest.raises(FileNotFoundError, match="SmolTalk parquet"):
        SmolTalk("train", path=tmp_path / "missing.parquet")


def test_smoltalk_remote_listing(tmp_path):
    """The real download path (datasets-server listing -> parquet files), against a local HTTP server."""
    import functools
    import http.server
    import threading

    from nanochat.tasks import smoltalk
    rows = [[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]] * 3
    _write_smoltalk(tmp_path / "0000.parquet", rows)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(tmp_path)))
    base = f"http://127.0.0.1:{server.server_address[1]}"
    (tmp_path / "parquet").write_text(json.dumps({"parquet_files": [
        {"dataset": smoltalk.DATASET, "config": "default", "split": "train", "url": f"{base}/0000.parquet"},
        {"dataset": smoltalk.DATASET, "config": "default", "split": "test", "url": f"{base}/nope.parquet"}]}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        paths = smoltalk.download_split("train", out_dir=tmp_path / "cache", api_url=f"{base}/parquet")
        assert len(paths) == 1 and len(smoltalk.SmolTalk("train", path=paths)) == 3
    finally:
        server.shutdown()


def test_data_root_errors(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="--data_root"):
        resolve_data_root(missing)
    monkeypatch.setenv("NANOCHAT_EVAL_DATA", str(missing))
    with pytest.raises(FileNotFoundError, match="NANOCHAT_EVAL_DATA"):
        resolve_data_root()
    monkeypatch.setenv("NANOCHAT_EVAL_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing data file"):
        GSM8K("test")
