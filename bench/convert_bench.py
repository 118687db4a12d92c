"""Convert a ~1B-parameter random Llama both ways: seconds and peak host memory.

The HF checkpoint is written shard by shard from random tensors (no transformers model
is held). Each step runs in its own process; peak RSS is that process's ru_maxrss (the
torch_dist writer's forked helpers share its pages and are smaller). Ratios are to the
checkpoint's size on disk and to a baseline that just reads the whole checkpoint
(safetensors load_file), measured side by side in this run.

    .venv/bin/python bench/convert_bench.py [--layers 16] [--dtype bf16] [--keep DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)


def write_random_llama(out_dir: str, layers: int, dtype_name: str) -> int:
    import torch
    from safetensors.torch import save_file

    from anchored_megatron.models.dtypes import DTYPES

    dtype = DTYPES[dtype_name]
    h, f, heads, groups, vocab = (SHAPE[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size"))
    kv = groups * h // heads
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    os.makedirs(out_dir, exist_ok=True)
    weight_map, total = {}, 0
    shards = [["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]] + [[i] for i in range(layers)]
    files = []
    for index, group in enumerate(shards):
        tensors = {}
        for item in group:
            if isinstance(item, str):
                tensors[item] = rand(h) + 1 if item == "model.norm.weight" else rand(vocab, h)
                continue
            p = f"model.layers.{item}."
            tensors.update({
                p + "input_layernorm.weight": rand(h) + 1, p + "post_attention_layernorm.weight": rand(h) + 1,
                p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                p + "mlp.gate_proj.weight": rand(f, h), p + "mlp.up_proj.weight": rand(f, h), p + "mlp.down_proj.weight": rand(h, f),
            })
        name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, os.path.join(out_dir, name), metadata={"format": "pt"})
        files.append(name)
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
        "dtype": {"bf16": "bfloat16", "fp32": "float32"}[dtype_name], **SHAPE,
    }
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(config, fh)
    return total


_RUNNER = """
import resource, subprocess, sys, time
import psutil
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
root, peak = psutil.Process(child.pid), 0
while child.poll() is None:
    total = 0
    try:
        for proc in [root, *root.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
    except psutil.NoSuchProcess:
        pass
    peak = max(peak, total)
    time.sleep(0.1)
if child.returncode:
    sys.exit(child.returncode)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, peak)
"""


def measured(args: list[str]) -> tuple[float, float, float]:
    """Run a child python; return (seconds, its peak RSS, peak PSS of its process tree), bytes.

    A fresh runner per step reads RUSAGE_CHILDREN, so each step's ru_maxrss is its own. The
    torch_dist writer forks helpers that read the tensors (mmap'd safetensors pages land in
    their RSS, not the parent's), so the tree's summed PSS, polled every 0.1 s, is the
    honest footprint (shared pages counted once, file-backed pages included).
    """
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _RUNNER, sys.executable, *args], cwd=ROOT, check=True,
                          capture_output=True, text=True)
    rss, pss = (float(v) for v in done.stdout.split())
    return time.perf_counter() - start, rss, pss


IMPORTS_ONLY = "import torch, megatron.core.dist_checkpointing, safetensors.torch, anchored_megatron.convert"
READ_ALL = """
import os, sys
from safetensors.torch import load_file
d = sys.argv[1]
tensors = [load_file(os.path.join(d, f)) for f in sorted(os.listdir(d)) if f.endswith('.safetensors')]
"""


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--keep", default=None, help="work directory to keep (default: a temporary one, removed)")
    args = parser.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="convert-bench-")
    hf, mg, back = (os.path.join(work, n) for n in ("hf", "megatron", "hf_back"))
    for path in (mg, back):
        shutil.rmtree(path, ignore_errors=True)
    try:
        gen_start = time.perf_counter()
        size = write_random_llama(hf, args.layers, args.dtype)
        gen_seconds = time.perf_counter() - gen_start
        params = size // (2 if args.dtype == "bf16" else 4)
        _, imports_rss, imports_pss = measured(["-c", IMPORTS_ONLY])
        base_s, base_rss, base_pss = measured(["-c", READ_ALL, hf])
        import_s, import_rss, import_pss = measured(["tools/convert_hf_to_megatron.py", "--hf", hf, "--out", mg, "--dtype", args.dtype, "--no-progress"])
        export_s, export_rss, export_pss = measured(["tools/convert_megatron_to_hf.py", "--ckpt", mg, "--out", back, "--dtype", args.dtype,
                                         "--no-progress", "--max-shard-size", "1GB"])
        identical = _identical(hf, back)
        gib = 1024**3
        print(f"# convert_bench  {datetime.date.today().isoformat()}")
        print(f"random Llama: {params / 1e9:.2f}B params, {args.layers} layers, hidden {SHAPE['hidden_size']}, ffn {SHAPE['intermediate_size']}, "
              f"heads {SHAPE['num_attention_heads']}/{SHAPE['num_key_value_heads']}, vocab {SHAPE['vocab_size']}, untied, {args.dtype}")
        print(f"checkpoint: HF {dir_bytes(hf) / gib:.2f} GiB, Megatron dist ckpt {dir_bytes(mg) / gib:.2f} GiB "
              f"(generated in {gen_seconds:.1f} s); machine: {os.cpu_count()} cores (shared)")
        print(f"{'step':<34}{'seconds':>9}{'time / read-all':>17}{'peak RSS GiB':>14}{'tree PSS GiB':>14}{'PSS / ckpt':>12}{'(PSS-imports) / ckpt':>22}")
        rows = [("baseline: load_file every shard", base_s, base_rss, base_pss),
                ("HF -> Megatron (hf-to-megatron)", import_s, import_rss, import_pss),
                ("Megatron -> HF (megatron-to-hf)", export_s, export_rss, export_pss)]
        for label, seconds, rss, pss in rows:
            print(f"{label:<34}{seconds:>9.1f}{seconds / base_s:>17.1f}{rss / gib:>14.2f}{pss / gib:>14.2f}{pss / size:>12.2f}{(pss - imports_pss) / size:>22.2f}")
        print(f"imports alone (torch + Megatron + converter): {imports_rss / gib:.2f} GiB RSS, {imports_pss / gib:.2f} GiB PSS")
        print("PSS: summed over the converter and the torch_dist writer's forked helpers, polled every 0.1 s")
        print(f"round trip bit-identical: {identical}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def _identical(a: str, b: str) -> bool:
    import torch
    from safetensors import safe_open

    def index(d):
        path = os.path.join(d, "model.safetensors.index.json")
        if not os.path.exists(path):
            with safe_open(os.path.join(d, "model.safetensors"), "pt") as fh:
                return {name: "model.safetensors" for name in fh.keys()}
        with open(path) as fh:
            return json.load(fh)["weight_map"]

    ia, ib = index(a), index(b)
    if sorted(ia) != sorted(ib):
        return False
    for name in ia:
        with safe_open(os.path.join(a, ia[name]), "pt") as fa, safe_open(os.path.join(b, ib[name]), "pt") as fb:
            if not torch.equal(fa.get_tensor(name), fb.get_tensor(name)):
                return False
    return True


if __name__ == "__main__":
    main()
