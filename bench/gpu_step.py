"""GPU check: anchored-loss parity, and bf16 vs FP8 / anchored vs sft / fused vs unfused output layer training steps, side by side.

    python bench/gpu_step.py all --out DIR            # on one GPU (scripts/gpu_check.sh calls this)
    python bench/gpu_step.py all --out DIR --cpu-smoke  # the same path on CPU with a tiny model

``all`` runs, in order:
1. loss parity: ``vocab_parallel_anchored_loss`` on the device vs the float64 CPU reference
   of tests/anchor/reference.py on the same values (loss and gradient, four objectives), on
   bf16-valued fp32 logits over Llama-3's vocabulary (what a bf16 model hands the loss),
   plus the kernel's forward+backward time;
2. training steps, each in its own process (fresh memory peak, a failure stays contained):
   anchored and sft, in bf16 and in FP8, and bf16 anchored without the fused output layer
   (``model.fused_output_loss=false``), with the real trainer's roles, optimizer and
   step (``Trainer._build_roles`` / ``Trainer._train_step``) on synthetic token batches;
3. ratios measured in this one run (FP8 / bf16, anchored / sft, fused / unfused), written to DIR/gpu_step.json
   and DIR/gpu_step.md and printed last.
Configurations this machine cannot run (FP8 without Transformer Engine or an FP8 GPU) are
recorded as skipped with the refusal's message, never estimated.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# ~1B Llama (Llama-3.2-1B's shape) at TP=1, sequences of 2048, 16 384 tokens per step.
GPU_SHAPE = dict(preset="llama3-1b", seq_length=2048, micro_batch_size=2, global_batch_size=8, warmup=3, steps=8)
CPU_SHAPE = dict(preset="tiny", seq_length=64, micro_batch_size=2, global_batch_size=4, warmup=1, steps=2)
PARITY_GPU = dict(tokens=512, padded_vocab=128256, vocab=128200, timing_tokens=8192)
PARITY_CPU = dict(tokens=64, padded_vocab=512, vocab=500, timing_tokens=64)
STEP_TIMEOUT_S = 150  # one configuration, start-up included; 4 of them fit the 10-minute check
PARITY_TOLERANCE = 1e-4  # fp32 arithmetic on bf16-exact inputs; measured against float64


# ---- 1. loss parity ---------------------------------------------------------------------------
PARITY_CASES = {
    "anchored forward_kl logit": dict(alpha=0.5, interpolation="logit", divergence="forward_kl"),
    "anchored reverse_kl prob": dict(alpha=0.3, interpolation="prob", divergence="reverse_kl"),
    "anchored jsd + ce": dict(alpha=0.7, divergence="jsd", jsd_beta=0.5, ce_weight=0.2, temperature=2.0),
    "sft (ce only)": dict(alpha=1.0, ce_weight=1.0),
}


def loss_parity(device: torch.device, sizes: dict) -> dict:
    from anchored_megatron.anchor import vocab_parallel_anchored_loss
    from tests.anchor.reference import reference_loss, relative_error

    generator = torch.Generator().manual_seed(1234)
    n, width, vocab = sizes["tokens"], sizes["padded_vocab"], sizes["vocab"]
    # Fresh random logits on a realistic scale, rounded to bf16 and held in fp32: what the
    # loss receives from a bf16 model (Float16Module upcasts the logits).
    student, reference, anchor = (
        (3.0 * torch.randn(n, width, generator=generator)).to(torch.bfloat16).float() for _ in range(3)
    )
    labels = torch.randint(0, vocab, (n,), generator=generator)
    labels[::7] = -100
    weights = torch.rand(n, generator=generator, dtype=torch.float64)
    results = {}
    fallbacks = []
    for name, options in PARITY_CASES.items():
        leaf = student.clone().to(device).requires_grad_(True)  # a fresh leaf: no grad carried between cases
        with warnings.catch_warnings(record=True) as caught:  # a torch.compile fallback warns once
            warnings.simplefilter("always", RuntimeWarning)
            per_token = vocab_parallel_anchored_loss(
                leaf, reference.to(device), anchor.to(device), labels=labels.to(device), vocab_size=vocab, **options
            )
        fallbacks += [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
        (per_token.double() * weights.to(device)).sum().backward()
        ref_leaf = student.double().requires_grad_(True)
        ref_loss, _ = reference_loss(ref_leaf, reference.double(), anchor.double(), labels=labels, vocab_size=vocab, **options)
        (ref_grad,) = torch.autograd.grad((ref_loss * weights).sum(), ref_leaf)
        loss_err = relative_error(per_token.detach().cpu(), ref_loss)
        grad_err = relative_error(leaf.grad.cpu(), ref_grad)
        padded_grad_zero = bool((leaf.grad[:, vocab:] == 0).all().item())
        finite = bool(torch.isfinite(per_token).all().item() and torch.isfinite(leaf.grad).all().item())
        results[name] = dict(
            loss_rel_err=loss_err, grad_rel_err=grad_err, padded_grad_zero=padded_grad_zero, finite=finite,
            passed=finite and padded_grad_zero and loss_err < PARITY_TOLERANCE and grad_err < PARITY_TOLERANCE,
        )
    from anchored_megatron.anchor import fused_passes

    compiled = "fell back to eager: " + fallbacks[0] if fallbacks else ("used" if not fused_passes._compile_failed else "off")
    kernel = time_loss_kernel(device, sizes)
    eager = time_loss_kernel(device, sizes, fused=False)
    kernel["eager_fwd_bwd_ms"] = eager["fwd_bwd_ms"]
    return dict(cases=results, tokens=n, padded_vocab=width, vocab=vocab, tolerance=PARITY_TOLERANCE, compiled_kernels=compiled,
                passed=all(r["passed"] for r in results.values()), kernel=kernel)


def time_loss_kernel(device: torch.device, sizes: dict, repeats: int = 10, fused: bool = True) -> dict:
    """Median forward+backward time of the anchored loss over [timing_tokens, padded_vocab] fp32 logits
    (``fused=False``: the eager passes, ANCHORED_FUSED_LOSS=0)."""
    from anchored_megatron.anchor import vocab_parallel_anchored_loss

    n, width = sizes["timing_tokens"], sizes["padded_vocab"]
    student, reference, anchor = ((3.0 * torch.randn(n, width, device=device)).to(torch.bfloat16).float() for _ in range(3))
    times = []
    previous = os.environ.get("ANCHORED_FUSED_LOSS")
    os.environ["ANCHORED_FUSED_LOSS"] = "1" if fused else "0"
    try:
        for i in range(repeats + 2):
            leaf = student.detach().requires_grad_(True)
            _sync(device)
            start = time.perf_counter()
            vocab_parallel_anchored_loss(leaf, reference, anchor, alpha=0.5, vocab_size=sizes["vocab"]).sum().backward()
            _sync(device)
            if i >= 2:  # two warm-ups (the first call compiles)
                times.append(time.perf_counter() - start)
    finally:
        if previous is None:
            os.environ.pop("ANCHORED_FUSED_LOSS", None)
        else:
            os.environ["ANCHORED_FUSED_LOSS"] = previous
    median = statistics.median(times)
    return dict(tokens=n, padded_vocab=width, fwd_bwd_ms=1e3 * median, tokens_per_s=n / median)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- 2. one training configuration (own process) ---------------------------------------------
def run_config(precision: str, objective: str, cpu_smoke: bool, fused: bool = True) -> dict:
    """Build the trainer's roles for one configuration and time its steps."""
    cfg, shape, record = plan_config(precision, objective, cpu_smoke, fused)
    if "skipped" in record:
        return record
    return dict(record, **_time_steps(cfg, shape))


def plan_config(precision: str, objective: str, cpu_smoke: bool, fused: bool = True):
    """(RunConfig, shape, record); the record says ``skipped`` with the refusal when this
    machine cannot run the configuration (checked without importing Megatron). ``fused``:
    ``model.fused_output_loss``."""
    from anchored_megatron.config import ConfigError, ModelConfig, RunConfig
    from anchored_megatron.config import apply_preset
    from anchored_megatron.platform import accelerators

    shape = CPU_SHAPE if cpu_smoke else GPU_SHAPE
    fp8 = precision == "fp8"
    # bf16 and FP8 share the TE layers when TE is here, so only the GEMM precision differs.
    # FP8 always asks for TE and bf16, so a machine without them shows its refusal.
    impl = "transformer_engine" if fp8 or accelerators.has_transformer_engine() else "local"
    set_here = {"seq_length", "params_dtype", "transformer_impl", "fp8", "fp8_recipe", "fused_output_loss"}
    model = apply_preset(ModelConfig(
        preset=shape["preset"],
        seq_length=shape["seq_length"],
        params_dtype="fp32" if cpu_smoke and not fp8 else "bf16",
        transformer_impl=impl,
        fp8="hybrid" if fp8 else None,
        fp8_recipe="delayed",
        fused_output_loss=fused,
    ), explicit=set_here)
    cfg = RunConfig(output_dir="unused-by-the-benchmark", model=model)
    cfg.anchor.objective = objective
    cfg.train.micro_batch_size = shape["micro_batch_size"]
    cfg.train.global_batch_size = shape["global_batch_size"]
    cfg.optim.lr = 1e-5
    record = dict(precision=precision, objective=objective, fused_output_loss=fused, transformer_impl=model.transformer_impl,
                  preset=model.preset, seq_length=model.seq_length, tokens_per_step=shape["global_batch_size"] * model.seq_length)
    try:
        for part in (cfg.parallel.validate, lambda: model.validate(cfg.parallel), cfg.anchor.validate, cfg.optim.validate):
            part()
        from anchored_megatron.models import te

        te.check_environment(model, cfg.parallel)
    except ConfigError as exc:
        record["skipped"] = str(exc)
    return cfg, shape, record


def _synthetic_batches(cfg, num_microbatches: int, device) -> list[dict]:
    """Random tokens over the true vocabulary, every position a response token, causal mask."""
    generator = torch.Generator().manual_seed(cfg.seed)
    b, s = cfg.train.micro_batch_size, cfg.model.seq_length
    causal_mask = ~torch.ones(s, s, dtype=torch.bool).tril_()  # True = masked out (Megatron's convention)
    batches = []
    for _ in range(num_microbatches):
        tokens = torch.randint(0, cfg.model.vocab_size, (b, s + 1), generator=generator)
        batch = dict(
            tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(b, s),
            position_ids=torch.arange(s).expand(b, s), attention_mask=causal_mask.expand(b, 1, s, s),
        )
        batches.append({k: v.contiguous().to(device) for k, v in batch.items()})
    return batches


def _time_steps(cfg, shape: dict) -> dict:
    from anchored_megatron.platform import initialize, shutdown
    from anchored_megatron.platform.collective_timeout import Watch
    from anchored_megatron.training.forward_step import make_forward_step
    from anchored_megatron.training.objectives import iteration_loss
    from anchored_megatron.training.roles import copy_weights
    from anchored_megatron.training.trainer import Trainer

    trainer = Trainer.__new__(Trainer)  # the real trainer, minus its data pipeline and checkpoints
    trainer.cfg = cfg
    trainer.watch = Watch("train.collective_timeout_minutes", cfg.train.collective_timeout_minutes)
    trainer.runtime = initialize(cfg.parallel, seed=cfg.seed)
    device = trainer.runtime.device
    total = shape["warmup"] + shape["steps"]
    trainer.num_microbatches = cfg.train.num_microbatches(trainer.runtime.data_parallel_size)
    trainer.replay_sampler = None  # no replay data: the synthetic batches are all gold ones
    trainer.steps_per_iteration = trainer.total_steps = trainer.stop_step = total
    trainer._build_roles()
    for frozen in (trainer.reference, trainer.snapshot):
        if frozen is not None:
            copy_weights(trainer.student, frozen)  # what an iteration start does, without the disk copy
    batches = _synthetic_batches(cfg, trainer.num_microbatches, device)
    trainer._microbatches = lambda: batches
    forward_step = make_forward_step(lambda: iteration_loss(cfg.anchor, 0), cfg.model.vocab_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(total):
        _sync(device)
        start = time.perf_counter()
        record = trainer._train_step(forward_step)  # ends in .item(): the step is complete
        elapsed = time.perf_counter() - start
        losses.append(record["loss"])
        if step >= shape["warmup"]:
            times.append(elapsed)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    shutdown()
    median = statistics.median(times)
    return dict(
        roles=trainer.num_roles, step_time_s=median, step_time_spread_s=max(times) - min(times),
        tokens_per_s=cfg.train.global_batch_size * cfg.model.seq_length / median,
        peak_memory_gib=peak, losses=losses, finite=all(loss == loss and abs(loss) != float("inf") for loss in losses),
    )


# ---- 3. everything, side by side ------------------------------------------------------------------
# (precision, objective, model.fused_output_loss)
CONFIGS = [("bf16", "anchored", True), ("bf16", "anchored", False), ("fp8", "anchored", True), ("bf16", "sft", True), ("fp8", "sft", True)]


def run_all(out_dir: str, cpu_smoke: bool) -> dict:
    from anchored_megatron.platform import accelerators

    if not cpu_smoke and not accelerators.has_cuda():
        raise SystemExit("no CUDA device: run on a GPU, or pass --cpu-smoke")
    os.makedirs(out_dir, exist_ok=True)
    device = torch.device("cpu") if cpu_smoke else torch.device("cuda", 0)
    report = dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), machine=accelerators.summary(), cpu_smoke=cpu_smoke)
    print(f"machine: {json.dumps(report['machine'])}", flush=True)
    report["loss_parity"] = loss_parity(device, PARITY_CPU if cpu_smoke else PARITY_GPU)
    print(f"loss parity passed: {report['loss_parity']['passed']}", flush=True)
    report["steps"] = []
    for port, (precision, objective, fused) in enumerate(CONFIGS):
        report["steps"].append(_run_config_process(precision, objective, fused, cpu_smoke, out_dir, 29610 + port))
        print(f"{precision} {objective}{'' if fused else ' unfused'}: {_short(report['steps'][-1])}", flush=True)
    report["ratios"] = ratios(report["steps"])
    with open(os.path.join(out_dir, "gpu_step.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    table = markdown(report)
    with open(os.path.join(out_dir, "gpu_step.md"), "w") as fh:
        fh.write(table)
    print(table)
    return report


def _run_config_process(precision: str, objective: str, fused: bool, cpu_smoke: bool, out_dir: str, port: int) -> dict:
    _, _, planned = plan_config(precision, objective, cpu_smoke, fused)
    if "skipped" in planned:
        return planned
    path = os.path.join(out_dir, f"step_{precision}_{objective}{'' if fused else '_unfused'}.json")
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    command = [sys.executable, os.path.abspath(__file__), "step", "--precision", precision, "--objective", objective, "--json", path]
    if cpu_smoke:
        command.append("--cpu-smoke")
    if not fused:
        command.append("--unfused")
    try:
        result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return dict(precision=precision, objective=objective, fused_output_loss=fused, failed=f"timed out after {STEP_TIMEOUT_S} s: {stderr[-2000:]}")
    if result.returncode != 0 or not os.path.exists(path):
        return dict(precision=precision, objective=objective, fused_output_loss=fused, failed=result.stderr[-3000:] or f"exit code {result.returncode}")
    with open(path) as fh:
        return json.load(fh)


def ratios(steps: list[dict]) -> dict:
    timed = {(s["precision"], s["objective"], s["fused_output_loss"]): s for s in steps if "step_time_s" in s}

    def ratio(a, b, key="step_time_s"):
        if a in timed and b in timed and timed[a][key] is not None and timed[b][key] is not None:
            return timed[a][key] / timed[b][key]
        return None

    return {
        "fp8_over_bf16_step_time_anchored": ratio(("fp8", "anchored", True), ("bf16", "anchored", True)),
        "fp8_over_bf16_peak_memory_anchored": ratio(("fp8", "anchored", True), ("bf16", "anchored", True), "peak_memory_gib"),
        "anchored_over_sft_step_time_bf16": ratio(("bf16", "anchored", True), ("bf16", "sft", True)),
        "anchored_over_sft_step_time_fp8": ratio(("fp8", "anchored", True), ("fp8", "sft", True)),
        "fused_over_unfused_step_time_anchored_bf16": ratio(("bf16", "anchored", True), ("bf16", "anchored", False)),
        "fused_over_unfused_peak_memory_anchored_bf16": ratio(("bf16", "anchored", True), ("bf16", "anchored", False), "peak_memory_gib"),
    }


def _short(step: dict) -> str:
    if "skipped" in step:
        return f"skipped ({step['skipped']})"
    if "failed" in step:
        return f"FAILED ({step['failed'].strip().splitlines()[-1] if step['failed'].strip() else ''})"
    return f"{step['step_time_s']:.3f} s/step, {step['tokens_per_s']:.0f} tok/s"


def markdown(report: dict) -> str:
    def output_layer(step):
        return "fused" if step["fused_output_loss"] else "unfused"

    m = report["machine"]
    lines = [
        f"GPU check {report['date']} on {m['device']} (torch {m['torch']}, CUDA {m['cuda']}, "
        f"Transformer Engine {m['transformer_engine']}, apex {m['apex']})" + (" -- CPU SMOKE RUN, not a GPU figure" if report["cpu_smoke"] else ""),
        "",
        "| precision | objective | output layer | layers | step time (s) | tokens/s | peak memory (GiB) | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in report["steps"]:
        if "step_time_s" in s:
            peak = f"{s['peak_memory_gib']:.1f}" if s["peak_memory_gib"] is not None else "n/a"
            note = "" if s["finite"] else "non-finite loss"
            lines.append(f"| {s['precision']} | {s['objective']} | {output_layer(s)} | {s['transformer_impl']} | {s['step_time_s']:.3f} | "
                         f"{s['tokens_per_s']:.0f} | {peak} | {note} |")
        else:
            lines.append(f"| {s['precision']} | {s['objective']} | {output_layer(s)} | | | | | {_short(s)} |")
    lines += ["", "| ratio (measured in this run) | value |", "| --- | --- |"]
    for name, value in report["ratios"].items():
        lines.append(f"| {name} | {'n/a' if value is None else f'{value:.3f}'} |")
    parity = report["loss_parity"]
    kernel = parity["kernel"]
    lines += [
        "",
        f"Anchored loss vs float64 CPU reference ({parity['tokens']} tokens x {parity['padded_vocab']} vocab, bf16-valued fp32 logits): "
        f"{'PASS' if parity['passed'] else 'FAIL'} (tolerance {parity['tolerance']:g})",
        "",
        "| case | loss rel. err | grad rel. err |",
        "| --- | --- | --- |",
    ]
    for name, case in parity["cases"].items():
        lines.append(f"| {name} | {case['loss_rel_err']:.2e} | {case['grad_rel_err']:.2e} |")
    lines.append(f"\nLoss kernel fwd+bwd (snapshot anchor): {kernel['fwd_bwd_ms']:.2f} ms for {kernel['tokens']} tokens x {kernel['padded_vocab']} "
                 f"({kernel['tokens_per_s']:.0f} tokens/s); eager passes {kernel['eager_fwd_bwd_ms']:.2f} ms "
                 f"({kernel['eager_fwd_bwd_ms'] / kernel['fwd_bwd_ms']:.2f}x); compiled kernels: {parity['compiled_kernels']}\n")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    everything = sub.add_parser("all", help="parity + every step configuration + ratios")
    everything.add_argument("--out", default=os.environ.get("OUT", os.path.join(REPO, "bench", "results", "gpu_step")))
    everything.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: checks the script end to end")
    step = sub.add_parser("step", help="one configuration (run by `all` in its own process)")
    step.add_argument("--precision", choices=["bf16", "fp8"], required=True)
    step.add_argument("--objective", choices=["anchored", "sft"], required=True)
    step.add_argument("--json", required=True)
    step.add_argument("--cpu-smoke", action="store_true")
    step.add_argument("--unfused", action="store_true", help="model.fused_output_loss=false")
    args = parser.parse_args(argv)
    if args.command == "all":
        report = run_all(args.out, args.cpu_smoke)
        failed = not report["loss_parity"]["passed"] or any("failed" in s for s in report["steps"])
        return 1 if failed else 0
    record = run_config(args.precision, args.objective, args.cpu_smoke, fused=not args.unfused)
    with open(args.json, "w") as fh:
        json.dump(record, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
