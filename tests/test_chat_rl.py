"""RL: group advantages, the token-level policy-gradient loss against a hand computation, sampled
row masks, and scripts.chat_rl end to end (2 steps on the CPU from the tiny base checkpoint)."""
from __future__ import annotations

import json

import pytest
import torch

from nanochat.data.sft import collate
from scripts.chat_rl import group_advantages, policy_gradient_loss, sample_group
from tests.helpers_chat import tiny_model, tiny_tokenizer
from tests.test_chat_sft import TAG, tiny_run, tiny_template  # noqa: F401  (fixtures)


def test_group_advantages_subtract_the_mean_only():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert torch.equal(adv, torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert torch.equal(group_advantages(torch.tensor([1.0, 1.0, 1.0])), torch.zeros(3))  # nothing to learn
    assert torch.allclose(group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0])), torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_policy_gradient_loss_matches_hand_computation():
    torch.manual_seed(0)
    model = tiny_model().float()
    # 4 samples of one prompt: prompt tokens (mask 0), sampled tokens (1), a forced tool output (0) in row 1
    prompt = [3, 17, 42, 9]
    rows = [
        (prompt + [5, 6, 7], [0] * 4 + [1, 1, 1]),
        (prompt + [8, 100, 101, 11, 12], [0] * 4 + [1, 0, 0, 1, 1]),
        (prompt + [13], [0] * 4 + [1]),
        (prompt + [14, 15, 16, 17, 18, 19], [0] * 4 + [1] * 6),
    ]
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    num_tokens = sum(sum(m) for _, m in rows)
    assert num_tokens == 13
    x, y = collate(rows, pad_id=0)
    loss = policy_gradient_loss(model, x, y, advantages, num_tokens)

    # by hand: log-softmax of the full logits, summed over the mask-1 tokens of each row only
    logp_all = torch.log_softmax(model(x), dim=-1)
    expected = 0.0
    for b, (ids, mask) in enumerate(rows):
        for t in range(1, len(ids)):
            if mask[t]:
                expected += advantages[b].item() * logp_all[b, t - 1, ids[t]].item()
    expected = -expected / num_tokens
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    # had the masked positions (prompt, tool output, padding) counted, the value would differ
    with_masked = -sum(advantages[b].item() * logp_all[b, t - 1, ids[t]].item()
                       for b, (ids, _) in enumerate(rows) for t in range(1, len(ids))) / num_tokens
    assert abs(with_masked - expected) > 1e-3

    # the gradient only flows from rows with a non-zero advantage
    loss.backward()
    grad = model.lm_head.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad()
    policy_gradient_loss(model, x, y, torch.zeros(4), num_tokens).backward()
    assert model.lm_head.weight.grad.abs().sum() == 0


def test_sample_group_masks_prompt_and_keeps_stop_token():
    from nanochat.conversation import render_for_completion
    from nanochat.inference.engine import Engine

    tok = tiny_tokenizer()
    model = tiny_model()
    prompt = render_for_completion(tok, {"messages": [{"role": "user", "content": "What is 2+3?"}]})
    rows, replies = sample_group(Engine(model, tok), tok, prompt, num_samples=3, max_tokens=10,
                                 temperature=1.0, top_k=None, seed=0)
    stop = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
    assert len(rows) == len(replies) == 3
    for (ids, mask), reply in zip(rows, replies):
        assert ids[:len(prompt)] == prompt and mask[:len(prompt)] == [0] * len(prompt)
        generated = ids[len(prompt):]
        assert 1 <= len(generated) <= 10 and len(mask) == len(ids)
        assert not any(t in stop for t in generated[:-1])  # nothing recorded after a stop token
        assert reply == tok.decode([t for t in generated if t not in stop])


def test_chat_rl_two_steps_writes_checkpoint(tiny_run):
    from nanochat.checkpoint import load_model
    from scripts import chat_rl

    base, data = tiny_run
    result = chat_rl.main(["--source", "base", "--model_tag", TAG, "--device_type", "cpu", "--data_root", str(data),
                           "--num_iterations", "2", "--examples_per_step", "2", "--num_samples", "4",
                           "--device_batch_size", "3", "--max_new_tokens", "12", "--eval_every", "0",
                           "--eval_examples", "2", "--save_every", "-1"])
    assert result["steps"] == 2
    assert 0.0 <= result["pass@1"] <= result["pass@4"] <= 1.0 and result["n"] == 2
    step_dir = base / "checkpoints" / "rl" / TAG / "step_000002"
    meta = json.loads((step_dir / "meta.json").read_text())
    assert {"step", "model_config", "train_config", "loader_state", "tokenizer_dir"} <= set(meta)
    model, _, _ = load_model("rl", "cpu", TAG)
    assert model.config.n_layer == 2
    assert json.loads((base / "report" / "chat_rl.json").read_text())["data"]["steps"] == 2


def test_chat_rl_from_a_model_dir_logs_to_tensorboard(tiny_run):
    from scripts import chat_rl
    from tests.test_chat_sft import moved_model, tensorboard_scalars

    base, data = tiny_run
    moved = moved_model(base)
    tb = base.parent / "tb"
    result = chat_rl.main(["--model", str(moved), "--device_type", "cpu", "--data_root", str(data),
                           "--num_iterations", "2", "--examples_per_step", "2", "--num_samples", "2",
                           "--max_new_tokens", "4", "--eval_every", "0", "--eval_examples", "2",
                           "--tensorboard", str(tb)])
    meta = json.loads((base / "checkpoints" / "rl" / TAG / "step_000002" / "meta.json").read_text())
    assert meta["source"] == {"path": str(moved), "step": 0}
    scalars = tensorboard_scalars(tb)
    assert [r["reward"] for r in result["history"]] == pytest.approx(scalars["rl/reward"])
    assert scalars["rl/pass@1"] == [result["pass@1"]]


def test_chat_rl_raises_a_toy_reward_and_resumes_exactly(tiny_run, monkeypatch):
    """The sign and plumbing of the whole loop: rewarded replies (here: starting with a vowel, ~20% of a
    random model's) become more likely within 16 steps (at 8 the recipe's tiny model was still noisy: 0.06 ->
    0.31 -> 0.06). Resuming at step 8 replays steps 9..16."""
    from scripts import chat_rl

    _, data = tiny_run
    monkeypatch.setattr(chat_rl.GSM8K, "evaluate", lambda self, conv, completion: int(completion[:1].lower() in "aeiou"))
    flags = ["--source", "base", "--model_tag", TAG, "--device_type", "cpu", "--data_root", str(data),
             "--num_iterations", "16", "--examples_per_step", "2", "--num_samples", "8", "--device_batch_size", "8",
             "--max_new_tokens", "3", "--init_lr_frac", "1.0", "--eval_examples", "0", "--seed", "2"]
    result = chat_rl.main(flags + ["--save_every", "8"])
    rewards = [h["reward"] for h in result["history"]]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.15, rewards

    resumed = chat_rl.main(flags + ["--resume_from_step", "8", "--overwrite"])  # redo steps 9..16
    assert [h["step"] for h in resumed["history"]] == list(range(9, 17))
    for a, b in zip(result["history"][8:], resumed["history"]):
        assert a["reward"] == b["reward"] and abs(a["loss"] - b["loss"]) <= 1e-5, (result["history"], resumed["history"])
