"""Anchored Learning in an existing Megatron-LM ``pretrain_gpt.py`` run: the wiring.

Run from a Megatron-LM checkout, with Megatron-LM's usual arguments plus three of ours:

    torchrun --nproc_per_node 8 examples/megatron_lm_dropin.py <Megatron-LM args> \
        --anchor-reference /checkpoints/llama3-8b-sft-megatron --anchor-alpha 0.5 \
        --anchor-steps-per-iteration 500

Megatron-LM's ``train_step`` passes ``adjust_tensor_shapes_fn`` to ``forward_backward_func`` only
for ModelOpt distillation; with pipeline parallelism, make that argument
``ANCHORED.adjust_tensor_shapes_fn()`` (one line in megatron/training/training.py).
The frozen reference is read with ``anchored_megatron.checkpoint.weights.load_megatron_weights``
(an ``anchored-convert`` output); the snapshot is refreshed every
``--anchor-steps-per-iteration`` steps. See docs/scale-out.md.
"""

from __future__ import annotations

from anchored_megatron.config import AnchorConfig
from anchored_megatron.integrations.megatron_lm import AnchoredLearning

ANCHORED: AnchoredLearning | None = None


def add_anchor_args(parser):
    group = parser.add_argument_group("anchored learning")
    group.add_argument("--anchor-reference", required=True, help="frozen teacher checkpoint (anchored-convert output)")
    group.add_argument("--anchor-alpha", type=float, default=0.5)
    group.add_argument("--anchor-steps-per-iteration", type=int, required=True, help="optimizer steps per outer iteration (K epochs)")
    group.add_argument("--anchor-outer-iterations", type=int, default=5)
    return parser


def main() -> None:
    import pretrain_gpt  # Megatron-LM's own script: its model_provider, datasets and get_batch
    from megatron.core.enums import ModelType
    from megatron.training import get_args, pretrain

    def forward_step(data_iterator, model):
        # Built lazily: Megatron-LM parses the arguments inside pretrain().
        return ANCHORED.forward_step(data_iterator, model)

    def model_provider(*args, **kwargs):
        global ANCHORED
        if ANCHORED is None:
            a = get_args()
            ANCHORED = AnchoredLearning(
                AnchorConfig(alpha=a.anchor_alpha, outer_iterations=a.anchor_outer_iterations),
                vocab_size=a.padded_vocab_size if a.vocab_size is None else a.vocab_size,
                reference=a.anchor_reference,
                steps_per_iteration=a.anchor_steps_per_iteration,
                current_step=lambda: get_args().curr_iteration,
                get_batch=lambda it: pretrain_gpt.get_batch(it),  # (tokens, labels, loss_mask, attention_mask, position_ids)
            )
        return ANCHORED.model_provider(pretrain_gpt.model_provider)(*args, **kwargs)

    pretrain(
        pretrain_gpt.train_valid_test_datasets_provider,
        model_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        extra_args_provider=add_anchor_args,
    )


if __name__ == "__main__":
    main()
