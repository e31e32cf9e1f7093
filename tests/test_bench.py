"""scripts.bench and scripts.profile_kernels on the CPU: the table goes on past a crashed row, every output
is written, and the memory breakdown adds up to what the model and optimizer hold."""
import json

import pytest
import torch

from nanochat.model.gpt import GPT, config_from_depth
from nanochat.optim import build_optimizer
from scripts import bench, profile_kernels

TINY = ["--device_type=cpu", "--depth=1", "--max_seq_len=32", "--device_batch_size=2", "--vocab_size=256",
        "--warmup=1"]


def test_profile_kernels_cpu_smoke(capsys):
    out = profile_kernels.main([*TINY, "--steps=1", "--timed_steps=1", "--compile=false",
                                "--expect=loss=torch", "--expect=attention=cudnn"])
    assert out["timing"]["tok_per_s"] > 0 and out["timing"]["step_ms"] > 0
    assert out["groups"] and abs(sum(out["groups"].values()) - 1.0) < 1e-3
    # on the CPU the "kernels" are aten ops: the loss one is recognised, a GPU attention kernel is not there
    assert len(out["expect_failures"]) == 1 and "attention" in out["expect_failures"][0], out["expect_failures"]
    assert "_for_cpu" in out["expect_failures"][0]  # names what ran instead
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["config"]["depth"] == 1


def test_bench_marks_a_crashed_row_and_goes_on(tmp_path):
    result = bench.main([*TINY, "--kernel=torch,no_such_kernel", "--steps=1", f"--out_dir={tmp_path}"])
    ok, bad = result["rows"]
    assert ok["status"] == "ok" and ok["tok_per_s"] > 0, ok
    assert "tok_per_s" not in bad and "no_such_kernel" in bad["status"], bad["status"]
    table = (tmp_path / "bench.md").read_text()
    assert table.count("\n") == 4 and "no_such_kernel" in table
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][0]["kernel"] == "torch"
    assert (tmp_path / "row0.log").is_file() and (tmp_path / "row1.log").is_file()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_every_build_flag_reaches_the_rows():
    """The axes vary per row; every other flag of BuildConfig reaches profile_kernels as given to the bench."""
    import dataclasses

    from nanochat.build import BuildConfig
    from nanochat.flags import parse_flags
    cfg = parse_flags(bench.BenchConfig, ["--depth=2,4", "--smear=false", "--matrix_lr=0.01", "--compile=false",
                                          "--short_window=none", "--fp8_skip=*.c_q"])
    combo = bench.bench_combos({axis: getattr(cfg, axis) for axis in bench.AXES})[1]
    prof = parse_flags(profile_kernels.ProfileConfig, bench.row_argv(cfg, combo))
    assert {axis: getattr(prof, axis) for axis in bench.AXES} == combo and prof.depth == 4
    for f in dataclasses.fields(BuildConfig):
        if f.name not in bench.AXES:
            assert getattr(prof, f.name) == getattr(cfg, f.name), f.name
    assert (prof.smear, prof.matrix_lr, prof.compile, prof.fp8_skip) == (False, 0.01, False, ["*.c_q"])


def test_synthetic_rows_are_documents_under_doc_mask():
    """With --doc_mask (the default) a document starts every --doc_len tokens (one per row with 0) and the BOS
    appears nowhere else; bench passes its --doc_len to each row."""
    from nanochat.flags import parse_flags
    for doc_len, starts in ((0, [0]), (16, [0, 16, 32, 48])):
        cfg = parse_flags(profile_kernels.ProfileConfig, ["--max_seq_len=64", "--device_batch_size=3",
                                                          "--vocab_size=50", f"--doc_len={doc_len}"])
        idx, targets = profile_kernels.synthetic_rows(cfg, torch.device("cpu"))
        assert idx.shape == targets.shape == (3, 64)
        bos = (idx == profile_kernels.SYNTHETIC_BOS).nonzero()
        assert sorted({int(c) for c in bos[:, 1]}) == starts and len(bos) == 3 * len(starts)
    cfg = parse_flags(profile_kernels.ProfileConfig, ["--doc_mask=false", "--vocab_size=50"])
    assert not (profile_kernels.synthetic_rows(cfg, torch.device("cpu"))[0] == profile_kernels.SYNTHETIC_BOS).any()
    bcfg = parse_flags(bench.BenchConfig, ["--doc_len=256"])
    combo = bench.bench_combos({axis: getattr(bcfg, axis) for axis in bench.AXES})[0]
    assert parse_flags(profile_kernels.ProfileConfig, bench.row_argv(bcfg, combo)).doc_len == 256


def test_memory_breakdown_counts_weights_grads_and_optimizer_state():
    torch.manual_seed(0)
    cfg = config_from_depth(2, vocab_size=256, sequence_len=32, aspect_ratio=64, head_dim=64)
    model = GPT(cfg)
    model.init_weights()
    opt = build_optimizer(model)
    idx = torch.randint(0, 256, (2, 32))
    model(idx, idx).backward()
    opt.step()
    groups = model.param_groups()
    matrix = sum(p.numel() for p in groups["matrix"])
    other = sum(p.numel() for name, ps in groups.items() if name != "matrix" for p in ps)
    n_adam = sum(len(ps) for name, ps in groups.items() if name != "matrix")
    gib = 2**30
    mem = profile_kernels.memory_breakdown(model, opt, peak_gib=1.0)
    assert mem["weights"] == pytest.approx(4 * (matrix + other) / gib, abs=1e-3)
    assert mem["grads"] == mem["weights"]  # fp32 gradients of fp32 weights
    # Muon: one fp32 momentum per matrix; AdamW: two fp32 moments per parameter and a scalar step each
    expected_state = (4 * matrix + 8 * other + 4 * n_adam) / gib
    assert mem["optimizer"] == pytest.approx(expected_state, abs=1e-3)
    assert mem["rest"] == pytest.approx(1.0 - mem["weights"] - mem["grads"] - mem["optimizer"], abs=2e-3)


TINY_GRADS = ["--device_type=cpu", "--depth=1", "--max_seq_len=32", "--device_batch_size=2", "--vocab_size=256",
              "--data=random", "--steps=2"]


def test_train_grads_check_passes_the_triton_kernel(monkeypatch):
    """In the Triton interpreter (fp32 on the CPU) our kernel's whole-model gradients equal `torch`'s."""
    from benchmarks import check_train_grads
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    result = check_train_grads.main([*TINY_GRADS, "--kernels=torch,triton"])
    assert result["failed"] == 0
    assert all(row["triton"]["grad_err"] < 1e-4 and abs(row["triton"]["loss_diff"]) < 1e-5 for row in result["rows"])
    assert all(row["triton"]["sign_flips"] == 0.0 for row in result["rows"])  # fp32: no element changes sign


def test_train_grads_check_fails_a_kernel_with_wrong_gradients(monkeypatch):
    """A backend whose logits come out 1.1x too large fails the check at every step."""
    from benchmarks import check_train_grads
    from nanochat import kernels
    from nanochat.kernels.loss_torch import TorchLoss

    class Skewed(TorchLoss):
        name = "skewed"

        def fused_linear_cross_entropy(self, h, w, t, **kw):
            return super().fused_linear_cross_entropy(h, 1.1 * w, t, **kw)
    monkeypatch.setitem(kernels.LOSS_BACKENDS, "skewed", Skewed())
    result = check_train_grads.main([*TINY_GRADS, "--kernels=torch,skewed"])
    assert result["failed"] == 2 and all(not row["skewed"]["ok"] for row in result["rows"])
    assert all(row["skewed"]["sign_flips"] > 0 for row in result["rows"])
    kernels.set_kernel_backend("torch")


def test_compile_mode_reaches_the_model_and_unknown_modes_are_refused(monkeypatch):
    from nanochat import runtime

    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(kw) or model)
    model = torch.nn.Linear(2, 2)
    assert runtime.compile_model(model, "max-autotune-no-cudagraphs") is model
    assert runtime.compile_model(model) is model
    assert seen == [{"dynamic": False, "mode": "max-autotune-no-cudagraphs"}, {"dynamic": False, "mode": None}]
    with pytest.raises(ValueError, match="max-autotune-no-cudagraphs"):
        runtime.compile_model(model, "max-autotune")


def test_inductor_settings_are_applied_and_bad_ones_named():
    from torch._inductor import config as inductor_config

    from nanochat import runtime

    before = inductor_config.triton.prefer_nd_tiling, inductor_config.max_fusion_size
    try:
        applied = runtime.apply_inductor_config("triton.prefer_nd_tiling=True; max_fusion_size=7;default")
        assert applied == {"triton.prefer_nd_tiling": True, "max_fusion_size": 7}
        assert inductor_config.triton.prefer_nd_tiling is True and inductor_config.max_fusion_size == 7
    finally:
        inductor_config.triton.prefer_nd_tiling, inductor_config.max_fusion_size = before
    assert runtime.apply_inductor_config("default") == {} and runtime.apply_inductor_config("") == {}
    with pytest.raises(ValueError, match="triton.no_such_knob"):
        runtime.apply_inductor_config("triton.no_such_knob=1")
    with pytest.raises(ValueError, match="Python literal"):
        runtime.apply_inductor_config("max_fusion_size=seven")


def test_bench_rows_carry_inductor_settings_and_width(tmp_path):
    cfg = bench.BenchConfig(aspect_ratio=768)
    combo = {"kernel": "triton", "inductor": "triton.prefer_nd_tiling=True", "compile_mode": "default"}
    argv = bench.row_argv(cfg, {**combo, "device_batch_size": 2, "max_seq_len": 8})
    assert "--inductor=triton.prefer_nd_tiling=True" in argv and "--aspect_ratio=768" in argv
    assert bench.compile_label(combo) == "default + triton.prefer_nd_tiling=True"
    assert bench.compile_label({**combo, "inductor": "default"}) == "default"
    # profile_kernels builds the width from depth x aspect_ratio (rounded up to head_dim 128: 128, then 256)
    flops = [profile_kernels.main([*TINY, f"--aspect_ratio={a}", "--steps=1", "--timed_steps=1", "--compile=false",
                                   "--max_seq_len=8"])["timing"]["flops_per_token"] for a in (64, 256)]
    assert flops[1] > 2 * flops[0]


def test_fp8_recipes_are_an_axis_of_fp8_rows_only():
    cfg = bench.BenchConfig(precision=["bf16", "fp8"], fp8_recipe=["triton", "triton_delayed"])
    axes = {"precision": cfg.precision, "depth": [2], "fp8_recipe": cfg.fp8_recipe}
    combos = bench.bench_combos(axes)
    assert [bench.precision_label(c) for c in combos] == ["bf16", "fp8 triton", "fp8 triton_delayed"]
    assert "--fp8_recipe=triton_delayed" in bench.row_argv(cfg, {**combos[2], "device_batch_size": 2,
                                                                 "max_seq_len": 8})


def test_gpu_clocks_summarizes_busy_samples_and_throttle_reasons():
    from benchmarks import gpu_clocks

    lines = ["100, 1470, 3201, 691.8, 63, 0x0000000000000004", "97, 1620, 3201, 650.0, 62, 0x0000000000000000",
             "0, 345, 3201, 80.0, 40, 0x0000000000000001", "[N/A], 1, 2"]
    samples = [s for s in map(gpu_clocks.parse_sample, lines) if s]
    assert len(samples) == 3 and samples[0]["reasons"] == 4
    out = gpu_clocks.summarize(samples, busy_pct=90)
    assert out["busy_samples"] == 2 and out["sm_mhz"] == 1545 and out["sm_mhz_min"] == 1470
    assert out["throttle"] == {"sw_power_cap": 0.5}  # the idle sample's gpu_idle bit is not counted
    assert gpu_clocks.summarize(samples[2:], busy_pct=90) == {"busy_samples": 0, "samples": 1}
    with pytest.raises(SystemExit, match="either --gemm"):
        gpu_clocks.main(["--gemm", "8x8x8", "--", "true"])
    with pytest.raises(SystemExit, match="either --gemm"):
        gpu_clocks.main([])


def test_muon_compile_is_an_axis_shown_in_the_compile_column():
    from nanochat.flags import parse_flags
    cfg = parse_flags(bench.BenchConfig, ["--muon_compile=true,false"])
    combos = bench.bench_combos({axis: getattr(cfg, axis) for axis in bench.AXES})
    assert [c["muon_compile"] for c in combos] == [True, False]
    assert [bench.compile_label(c) for c in combos] == ["default + muon compiled", "default + muon eager"]
    assert parse_flags(profile_kernels.ProfileConfig, bench.row_argv(cfg, combos[1])).muon_compile is False
    assert bench.compile_label({**combos[0], "muon_compile": None}) == "default"  # the default: compiled on CUDA
