"""The short table that ends benchmarks/fa4_gpu.sh: issue 26's targets read off the logs of its steps.

    python -m benchmarks.fa4_summary --out_dir out

Reads $out_dir/fa4_available.txt, fa4_gpu_tests.txt (pytest's summary line), check_kernels.txt and
bench_attention.txt (their last-line JSON); a missing or cut-short log is a row that says so, not a crash.
Prints a markdown table, then one JSON line.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_attention import FA4_MAX_REL_ERR  # noqa: E402
from nanochat.flags import parse_flags  # noqa: E402


@dataclass
class SummaryConfig:
    out_dir: str = "out"


def last_json(path: Path) -> dict | None:
    """The last line of a log that parses as a JSON object, or None."""
    if not path.exists():
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "FAIL")


def summarize(out_dir: Path) -> tuple[list[tuple[str, str, str, str]], dict]:
    """Rows (what, value, target, verdict) and the same as a dict for the JSON line."""
    rows, facts = [], {}
    available = out_dir / "fa4_available.txt"
    found = re.search(r"fa4 available: (.*)", available.read_text(errors="replace") if available.exists() else "")
    facts["available"] = found.group(1).strip() if found else "no log"
    rows.append(("fa4 available", facts["available"][:100], "(True, 'ok')", verdict("(True" in facts["available"])))

    tests = out_dir / "fa4_gpu_tests.txt"
    text = tests.read_text(errors="replace") if tests.exists() else ""
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|errors?|skipped|deselected)", ln)]
    facts["gpu_tests"] = lines[-1].strip("= ") if lines else "no summary (timed out?)"
    passed = "passed" in facts["gpu_tests"] and not re.search(r"failed|error", facts["gpu_tests"])
    rows.append(("GPU tests (test_attention_fa4.py -m gpu)", facts["gpu_tests"], "all pass", verdict(passed)))

    check = last_json(out_dir / "check_kernels.txt")
    fa4_checks = [r for r in (check or {}).get("results", []) if r.get("backend") == "fa4" and "ok" in r]
    errors = [r[k] for r in fa4_checks for k in ("out", "dq", "dk", "dv") if k in r]
    facts["check_max_rel_err"] = max(errors) if errors else None
    facts["check_failed"] = sum(not r["ok"] for r in fa4_checks)
    value = (f"max {max(errors):.2e} over {len(fa4_checks)} cases, {facts['check_failed']} failed" if errors
             else "no fa4 rows (see check_kernels.txt)")
    rows.append(("check_kernels fa4 vs fp32 (fresh inputs)", value, f"<= {FA4_MAX_REL_ERR:g}",
                 verdict(None if not errors else max(errors) <= FA4_MAX_REL_ERR and not facts["check_failed"])))

    bench = last_json(out_dir / "bench_attention.txt") or {}
    by_key = {(r["backend"], r["window"]): r for r in bench.get("rows", [])}
    window = bench.get("shape", {}).get("window", 512)
    for v in bench.get("vs_cudnn_full", []):
        row = by_key.get((v["backend"], v["window"]), {})
        target = "-" if v["target"] is None else f">= {v['target']}x"
        label = "full" if v["window"] is None else f"window {v['window']}"
        rows.append((f"{v['backend']} {label} vs cudnn full, fwd+bwd",
                     f"{v['speedup']:.2f}x ({row.get('layer_ms', float('nan')):.3f} ms)", target, verdict(v["ok"])))
    base = by_key.get(("cudnn", None), {}).get("layer_ms")
    rows.append(("cudnn full causal, fwd+bwd", "-" if base is None else f"{base:.3f} ms", "baseline", "-"))
    facts.update(bench_rel_err=bench.get("fa4_max_rel_err"), vs_cudnn_full=bench.get("vs_cudnn_full"),
                 cudnn_full_ms=base, window=window, gpu=bench.get("gpu"))
    if bench.get("fa4_max_rel_err") is not None:
        rows.append(("bench_attention fa4 vs fp32", f"max {bench['fa4_max_rel_err']:.2e}", f"<= {FA4_MAX_REL_ERR:g}",
                     verdict(bench["fa4_max_rel_err"] <= FA4_MAX_REL_ERR)))
    elif not bench:
        rows.append(("bench_attention", "no JSON (see bench_attention.txt)", "-", "FAIL"))
    return rows, facts


def main(argv: list[str] | None = None) -> None:
    cfg = parse_flags(SummaryConfig, argv, description=__doc__.split("\n")[0])
    rows, facts = summarize(Path(cfg.out_dir))
    print(f"\nissue 26 (FA4) on {facts.get('gpu') or 'the GPU'}: B32 H10 T2048 D128 bf16 unless noted")
    print("| what | value | target | result |\n| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(json.dumps({"fa4_summary": facts, "failed": sum(r[3] == "FAIL" for r in rows)}, default=str))


if __name__ == "__main__":
    main()
