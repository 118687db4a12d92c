"""Greedy chat replies from a Hugging Face model directory, the way the real-model study asks its
questions: each question as one user turn through the model's own chat template, batches left-padded
so that every prompt ends where generation starts, on CPU in float32."""

from __future__ import annotations


class ChatModel:
    """A model and its tokenizer, loaded once for every group of questions asked of it."""

    def __init__(self, model_dir: str, threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads is not None:
            torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def greedy(self, questions: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
        """One reply per question, stripped; the special tokens are left out."""
        import torch

        tokenizer, replies = self.tokenizer, []
        for first in range(0, len(questions), batch_size):
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
                     for q in questions[first:first + batch_size]]
            encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = self.model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            replies += [r.strip() for r in tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)]
        return replies


def greedy_replies(model_dir: str, questions: list[str], max_new_tokens: int, batch_size: int = 16, threads: int | None = None) -> list[str]:
    """One group of questions asked of the model in ``model_dir`` (loaded for this call only)."""
    return ChatModel(model_dir, threads).greedy(questions, max_new_tokens, batch_size)
