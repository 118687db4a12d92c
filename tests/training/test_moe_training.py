"""MoE students and frozen MoE / dense roles in the anchored trainer: a run at expert parallel 2
equals one at expert parallel 1, and the logged load-balancing loss equals one computed in
float64 from transformers' router logits (an independent implementation of the same model); its
evaluations (eval.*) agree across the two and leave the load-balancing loss untouched."""

import json
import os

import pytest
import torch

from anchored_megatron.config import RunConfig, build
from tests.convert.helpers import make_hf_model

SIZES = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             num_hidden_layers=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
SEQ, TOPK, EXPERTS = 24, 2, 4
AUX_COEFF = 0.01


@pytest.fixture(scope="module")
def moe_run(tiny_run, tmp_path_factory):
    """A Mixtral student, a dense Mistral teacher (same vocabulary and attention, its own MLP) and
    16 copies of one record longer than SEQ (truncated, unpadded): every row is the same tokens."""
    from anchored_megatron.convert import hf_to_megatron

    root = tmp_path_factory.mktemp("moe_run")
    moe_hf = make_hf_model("mixtral", str(root / "moe_hf"), intermediate_size=48, **SIZES)
    dense_hf = make_hf_model("mistral", str(root / "dense_hf"), seed=1, intermediate_size=64, **SIZES)
    hf_to_megatron(moe_hf, str(root / "moe"), "fp32", show_progress=False)
    hf_to_megatron(dense_hf, str(root / "dense"), "fp32", show_progress=False)
    record = {"prompt": "alpha beta",
              "response": "six seven eight nine ten plus minus equals one two three four five six seven"}
    data = root / "same.jsonl"
    data.write_text((json.dumps(record) + "\n") * 16)
    held_out = {"target": [{"prompt": "gamma delta", "response": "one two three four five six seven eight nine ten"}] * 3,
                "general": [{"prompt": "red blue", "response": "green red blue alpha beta gamma"},
                            {"prompt": "plus", "response": "minus equals two"}] * 2}
    for name, rows in held_out.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "moe_hf": moe_hf, "tokenizer": tiny_run["tokenizer"], "data": str(data),
            "moe": str(root / "moe"), "dense": str(root / "dense"), "target": str(root / "target.jsonl"),
            "general": str(root / "general.jsonl")}


def _config(paths, output_dir, ep, evaluate=False):
    evaluation = {"eval": {"paths": [paths["target"]], "general_paths": [paths["general"]], "interval": 1}} if evaluate else {}
    return {**evaluation,
        "output_dir": str(output_dir), "seed": 3,
        "model": {"seq_length": SEQ, "moe_aux_loss_coeff": AUX_COEFF},
        "parallel": {"ep": ep},
        "student": {"checkpoint": paths["moe"]},
        "reference": {"checkpoint": paths["dense"]},
        "data": {"paths": [paths["data"]], "tokenizer": paths["tokenizer"], "cache_dir": str(paths["root"] / "cache"),
                 "packing": False, "truncate": True},
        "anchor": {"objective": "anchored", "alpha": 0.5, "outer_iterations": 1, "epochs_per_iteration": 1},
        "optim": {"lr": 3e-3, "warmup_fraction": 0.0},
        "train": {"micro_batch_size": 1, "global_batch_size": 4, "max_steps": 3, "progress_bar": False, "tensorboard": False},
    }


def two_runs_rank(first, second):
    from anchored_megatron.training.trainer import train

    for cfg in (first, second):
        train(build(RunConfig, cfg))
    return True


def _records(output_dir, kind="train"):
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    return [r for r in rows if (r.get("record") == "eval") == (kind == "eval")]


def _switch_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load balancing, float64: E / (k T^2) * sum_e (sum_t p_te) * tokens_e
    (differentiable in the probabilities; the token counts are not)."""
    probs = router_logits.double().softmax(-1)
    tokens, experts = probs.shape
    chosen = probs.detach().topk(TOPK, dim=-1).indices.flatten()
    counts = torch.zeros(experts, dtype=torch.float64).index_add_(0, chosen, torch.ones(chosen.numel(), dtype=torch.float64))
    return experts / (TOPK * tokens * tokens) * (probs.sum(0) * counts).sum()


def _rows(paths):
    from anchored_megatron.config import DataConfig
    from anchored_megatron.data import build_sft_dataset, load_tokenizer

    cfg = build(DataConfig, _config(paths, "unused", 1)["data"])
    dataset = build_sft_dataset(cfg, load_tokenizer(paths["tokenizer"]), SEQ, seed=3)
    return [dataset[i] for i in range(len(dataset))]


@pytest.mark.distributed
def test_expert_parallel_run_equals_ep1_and_logs_the_load_balancing_loss(moe_run, tmp_path, ranks):
    ep1, ep2 = tmp_path / "ep1", tmp_path / "ep2"
    ranks(two_runs_rank, 2, _config(moe_run, ep1, 1, evaluate=True), _config(moe_run, ep2, 2, evaluate=True), timeout=600)
    one, two = _records(ep1), _records(ep2)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        for name in ("loss", "kl_step", "kl_reference", "moe_aux_loss"):
            assert abs(a[name] - b[name]) <= 1e-4, (a["step"], name, a[name], b[name])
    evals = _records(ep1, "eval"), _records(ep2, "eval")
    assert [r["step"] for r in evals[0]] == [r["step"] for r in evals[1]] == [0, 1, 2, 3]
    assert abs(evals[0][0]["general_kl_base"]) <= 1e-6 and evals[0][-1]["general_kl_base"] > 1e-4
    for a, b in zip(*evals):
        for name in ("target_loss", "general_loss", "general_kl_base"):
            assert abs(a[name] - b[name]) <= 1e-4, (a["step"], name, a[name], b[name])

    # Every row holds the same unpadded tokens, so each microbatch's loss is that row's.
    rows = _rows(moe_run)
    assert all(torch.equal(r["tokens"], rows[0]["tokens"]) for r in rows)
    assert len(set(rows[0]["document_ids"].tolist())) == 1
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(moe_run["moe_hf"], dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        router_logits = hf(rows[0]["tokens"].unsqueeze(0), output_router_logits=True).router_logits
    expected = sum(_switch_loss(layer).item() for layer in router_logits) / len(router_logits)
    assert one[0]["moe_aux_loss"] == pytest.approx(expected, rel=1e-5)
    assert two[0]["moe_aux_loss"] == pytest.approx(expected, rel=1e-5)

    # Both runs' checkpoints export to the per-expert tensors transformers reads, with the source config.
    from safetensors.torch import load_file

    from anchored_megatron.convert import megatron_to_hf

    exported = {}
    for run in (ep1, ep2):
        megatron_to_hf(str(run), str(run / "hf"), "fp32", show_progress=False)
        exported[run] = load_file(str(run / "hf" / "model.safetensors"))
        with open(run / "hf" / "config.json", "rb") as a, open(os.path.join(moe_run["moe_hf"], "config.json"), "rb") as b:
            assert a.read() == b.read()
    assert sorted(exported[ep1]) == sorted(exported[ep2])
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in exported[ep2]
    for name, tensor in exported[ep1].items():
        torch.testing.assert_close(exported[ep2][name], tensor, rtol=0, atol=1e-5, msg=name)


def aux_gradient_rank():
    """The trainer's student set-up (per-token loss convention, Megatron DDP, finalize_model_grads)
    with a zero main loss: the last router's gradient is the load-balancing loss's alone."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from anchored_megatron.config import ModelConfig, ParallelConfig
    from anchored_megatron.models.builder import build_model_chunks
    from anchored_megatron.models.layout import unwrap
    from anchored_megatron.platform import initialize
    from anchored_megatron.training.optim import wrap_ddp

    initialize(ParallelConfig(), seed=1)
    model = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2, vocab_size=128,
                        seq_length=8, num_moe_experts=EXPERTS, moe_router_topk=TOPK, moe_ffn_hidden_size=16, moe_aux_loss_coeff=AUX_COEFF)
    chunks = build_model_chunks(model, ParallelConfig(), calculate_per_token_loss=True)
    (wrapped,) = wrap_ddp(chunks, use_distributed_optimizer=False)
    chunks[0].config.finalize_model_grads_func = finalize_model_grads
    router = unwrap(chunks[0]).decoder.layers[-1].mlp.router
    seen = {}

    def keep_input(module, args, output):
        seen["input"] = args[0].detach().clone()

    router.register_forward_hook(keep_input)
    tokens = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(8).expand(2, 8)

    def forward_step(data_iterator, module):
        output = module(next(data_iterator), positions, None)
        # Per-token convention, 16 tokens: finalize_model_grads divides every gradient by them.
        return output, lambda out: ((out * 0).sum(), torch.tensor(16), {})

    wrapped.zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([tokens]), model=wrapped,
                                num_microbatches=1, seq_length=8, micro_batch_size=2)
    return router.weight.main_grad.clone(), router.weight.detach().clone(), seen["input"]


@pytest.mark.distributed
def test_the_load_balancing_loss_reaches_the_router_at_its_coefficient(ranks):
    grad, weight, hidden = ranks(aux_gradient_rank, 1)[0]
    w = weight.double().requires_grad_(True)
    (AUX_COEFF * _switch_loss(hidden.double().reshape(-1, hidden.shape[-1]) @ w.T)).backward()
    assert grad.abs().max() > 0
    torch.testing.assert_close(grad.double(), w.grad, rtol=1e-5, atol=1e-9)
