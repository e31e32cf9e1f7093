"""benchmarks/bench_decode_matmul on the CPU: the shapes it times are the decode step's, and it asks for a GPU."""
import pytest
import torch

from benchmarks import bench_decode_matmul


def test_shapes_are_the_models_decode_matmuls():
    matmuls, n_layer = bench_decode_matmul.shapes(20, 32768)
    assert n_layer == 20
    assert matmuls == {"qkv": (1280, 3 * 1280), "attn_proj": (1280, 1280), "mlp_fc": (1280, 4 * 1280),
                       "mlp_proj": (4 * 1280, 1280), "lm_head": (1280, 32768)}


def test_rowwise_fp8_keeps_each_row_to_an_e4m3_step():
    pytest.importorskip("triton")  # the decode kernels' module holds quantize_fp8
    x = torch.randn(4, 64) * torch.logspace(-3, 3, 4)[:, None]
    values, scale = bench_decode_matmul.rowwise_fp8(x)
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (4, 1)
    assert ((values.float() * scale - x).abs() / x.abs().amax(-1, keepdim=True)).max() <= 2 ** -4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_asks_for_a_gpu():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench_decode_matmul.main(["--batch", "2"])
