"""bench/gpu_step.py end to end on CPU (--cpu-smoke): the same path the GPU check runs."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "gpu_step.py"), "all", "--cpu-smoke", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_step.json").read_text())
    assert report["loss_parity"]["passed"]
    steps = {(s["precision"], s["objective"], s["fused_output_loss"]): s for s in report["steps"]}
    for objective, roles in (("anchored", 3), ("sft", 1)):
        bf16 = steps[("bf16", objective, True)]
        assert bf16["roles"] == roles and bf16["finite"] and bf16["step_time_s"] > 0
        # No CUDA here: FP8 is recorded as refused, with the option named, never timed.
        assert steps[("fp8", objective, True)]["skipped"].startswith("model.fp8:")
    unfused = steps[("bf16", "anchored", False)]
    assert unfused["roles"] == 3 and unfused["finite"] and unfused["step_time_s"] > 0
    ratios = report["ratios"]
    assert ratios["anchored_over_sft_step_time_bf16"] == steps[("bf16", "anchored", True)]["step_time_s"] / steps[("bf16", "sft", True)]["step_time_s"]
    assert ratios["fused_over_unfused_step_time_anchored_bf16"] == steps[("bf16", "anchored", True)]["step_time_s"] / unfused["step_time_s"]
    assert ratios["fp8_over_bf16_step_time_anchored"] is None
    table = (tmp_path / "gpu_step.md").read_text()
    assert "CPU SMOKE RUN" in table and "| bf16 | anchored | fused | local |" in table and "| bf16 | anchored | unfused | local |" in table
