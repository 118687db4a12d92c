"""Seeded, checkable synthetic tasks for the forgetting benchmark: general skills, an
iGSM-style target, response styles (entropy) and the three regimes' data sets."""

from anchored_megatron.data.synthetic import styles
from anchored_megatron.data.synthetic.regimes import (
    CHAT_TEMPLATE, REGIMES, RegimeData, eval_prompts, finetune_records, pretrain_records, render_prompt, replay_records,
    train_char_tokenizer, write_jsonl,
)
from anchored_megatron.data.synthetic.skills import GENERAL_SKILLS, Skill
from anchored_megatron.data.synthetic.target import TargetTask

__all__ = [
    "CHAT_TEMPLATE", "GENERAL_SKILLS", "REGIMES", "RegimeData", "Skill", "TargetTask", "eval_prompts",
    "finetune_records", "pretrain_records", "render_prompt", "replay_records", "styles", "train_char_tokenizer", "write_jsonl",
]
