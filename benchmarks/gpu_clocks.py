"""SM clock, power and throttle reasons while the GPU works: a GEMM alone, or any command (GPU).

    python -m benchmarks.gpu_clocks --gemm 65536x1280x5120 --seconds 15
    python -m benchmarks.gpu_clocks -- python -m scripts.bench --depth 20 --device_batch_size 32

Samples `nvidia-smi` every --interval_ms while the work runs and summarizes the busy samples (GPU
utilization >= --busy_pct): median SM clock, memory clock, power and temperature, and how often each
throttle reason was active. Why: a kernel that runs slower inside a training step than alone is either
waiting on something or running at a lower clock, and only the clock readings tell these apart.
With --gemm, a bf16 [M, K] x [K, N] matmul runs back to back and its TFLOP/s is reported beside the clocks.
Last line: one JSON object.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from nanochat.flags import parse_flags

QUERY = "utilization.gpu,clocks.sm,clocks.mem,power.draw,temperature.gpu,{reasons}.active"
# bits of clocks_throttle_reasons.active (nvidia-smi --help-query-gpu)
THROTTLE_BITS = {0x1: "gpu_idle", 0x2: "app_clocks", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
                 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake"}


@dataclass
class ClockConfig:
    gemm: str = field(default="", metadata={"help": "MxKxN: time this bf16 matmul alone (else: the command after --)"})
    seconds: float = 15.0
    interval_ms: int = 200
    busy_pct: int = 90


def parse_sample(line: str) -> dict | None:
    """One CSV line of QUERY (noheader, nounits) -> numbers; None for a line that does not parse."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 6:
        return None
    try:
        util, sm, mem, power, temp = (float(p) for p in parts[:5])
        reasons = int(parts[5], 16)
    except ValueError:
        return None
    return {"util": util, "sm_mhz": sm, "mem_mhz": mem, "power_w": power, "temp_c": temp, "reasons": reasons}


def summarize(samples: list[dict], busy_pct: int) -> dict:
    """Medians over the busy samples and the fraction of them with each throttle reason active."""
    busy = [s for s in samples if s["util"] >= busy_pct]
    if not busy:
        return {"busy_samples": 0, "samples": len(samples)}
    out = {"busy_samples": len(busy), "samples": len(samples)}
    for key in ("sm_mhz", "mem_mhz", "power_w", "temp_c"):
        out[key] = statistics.median(s[key] for s in busy)
    out["sm_mhz_min"] = min(s["sm_mhz"] for s in busy)
    out["throttle"] = {name: round(sum(bool(s["reasons"] & bit) for s in busy) / len(busy), 3)
                       for bit, name in THROTTLE_BITS.items() if any(s["reasons"] & bit for s in busy)}
    return out


class Sampler:
    """nvidia-smi in loop mode on a background thread, collecting parsed samples."""

    def __init__(self, interval_ms: int) -> None:
        fields = subprocess.run(["nvidia-smi", "--help-query-gpu"], capture_output=True, text=True).stdout
        # newer drivers call them clock event reasons; the old name may be gone
        reasons = "clocks_event_reasons" if "clocks_event_reasons.active" in fields else "clocks_throttle_reasons"
        self.proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={QUERY.format(reasons=reasons)}",
                                      "--format=csv,noheader,nounits", f"--loop-ms={interval_ms}", "--id=0"],
                                     stdout=subprocess.PIPE, text=True)
        self.samples: list[dict] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            sample = parse_sample(line)
            if sample:
                self.samples.append(sample)

    def stop(self) -> list[dict]:
        self.proc.terminate()
        self.thread.join(timeout=5)
        return self.samples


def run_gemm(spec: str, seconds: float) -> dict:
    import torch

    m, k, n = (int(x) for x in spec.lower().split("x"))
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()
        calls += 20
    elapsed = time.perf_counter() - start
    return {"gemm": spec, "ms_per_call": 1e3 * elapsed / calls, "tflops": 2 * m * k * n * calls / elapsed / 1e12}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    cfg = parse_flags(ClockConfig, argv[:argv.index("--")] if "--" in argv else argv,
                      description=__doc__.split("\n")[0])
    if bool(cfg.gemm) == bool(command):
        raise SystemExit("gpu_clocks: give either --gemm MxKxN or a command after --, not both or neither")
    sampler = Sampler(cfg.interval_ms)
    time.sleep(0.5)
    work = run_gemm(cfg.gemm, cfg.seconds) if cfg.gemm else {"command": " ".join(command),
                                                                  "returncode": subprocess.call(command)}
    result = {**work, **summarize(sampler.stop(), cfg.busy_pct)}
    print(f"busy samples {result['busy_samples']}/{result['samples']}: SM {result.get('sm_mhz', 0):.0f} MHz "
          f"(min {result.get('sm_mhz_min', 0):.0f}), memory {result.get('mem_mhz', 0):.0f} MHz, "
          f"{result.get('power_w', 0):.0f} W, {result.get('temp_c', 0):.0f} C, throttle {result.get('throttle', {})}"
          + (f"; {result['tflops']:.0f} TFLOP/s" if "tflops" in result else ""))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
