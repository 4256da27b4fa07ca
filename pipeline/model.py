"""`DePTModel`: a backbone with a `DePTPrompt` in front of it; the forward and generate every caller uses.

T5: the prompt and offset go on the encoder input only; decoder inputs and labels are untouched. LLaMA: the prompt
goes before the tokens (after any left padding) and the labels get -100 over it. Tokens are embedded by calling the
embedding *module*, so ZeRO-3 gathers its weight for the call; nothing here knows about DeepSpeed.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.backbone import Backbone, embedding_rows
from pipeline.dept import DeptConfig, DePTPrompt, init_prompt_, prompt_init_ids


class DePTModel(nn.Module):
    """`base_model` (a transformers seq2seq or causal LM) with `prompt` in front, or none (the finetune method)."""

    def __init__(self, base_model: nn.Module, prompt: DePTPrompt | None, is_encoder_decoder: bool):
        super().__init__()
        self.base_model = base_model
        self.prompt = prompt
        self.is_encoder_decoder = is_encoder_decoder

    def _inputs(self, input_ids, attention_mask, labels=None):
        embeds = self.base_model.get_input_embeddings()(input_ids)
        if self.prompt is None:
            return embeds, attention_mask, labels
        if self.is_encoder_decoder:
            embeds, attention_mask, _ = self.prompt(embeds, attention_mask)
            return embeds, attention_mask, labels
        return self.prompt(embeds, attention_mask, labels)

    def forward(self, input_ids, attention_mask, labels=None, decoder_input_ids=None):
        """input_ids/attention_mask: [batch, L]; labels: [batch, T] (T5 targets) or [batch, L] (LLaMA).
        Returns the backbone's output (loss when labels are given; logits [batch, T or m + L, vocab])."""
        embeds, mask, labels = self._inputs(input_ids, attention_mask, labels)
        kwargs = {"decoder_input_ids": decoder_input_ids} if decoder_input_ids is not None else {}
        return self.base_model(inputs_embeds=embeds, attention_mask=mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, max_new_tokens: int = 20, synced_gpus: bool = False):
        """Greedy generation; returns only the new tokens [batch, <= max_new_tokens].

        `synced_gpus` must be True under ZeRO-3 with several ranks: every rank keeps stepping until all are done,
        otherwise the parameter gathers deadlock.
        """
        embeds, mask, _ = self._inputs(input_ids, attention_mask)
        out = self.base_model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            synced_gpus=synced_gpus,
        )
        if self.is_encoder_decoder:
            out = out[:, 1:]  # T5 output starts with the decoder start token
        return out


def init_dept_prompt(config: DeptConfig, backbone: Backbone, seed: int) -> DePTPrompt:
    """A new DePT module for `backbone`: A drawn with `seed` (the same on every rank), the prompt from the frozen
    embeddings of the init text's tokens (TEXT), of random vocabulary rows (VOCAB), or U(-0.5, 0.5) (RANDOM)."""
    torch.manual_seed(seed)
    prompt = DePTPrompt(config)
    vocab = backbone.model.get_input_embeddings().num_embeddings
    ids = prompt_init_ids(config, backbone.tokenizer, vocab, seed)
    init_prompt_(prompt, None if ids is None else embedding_rows(backbone, ids), seed)
    return prompt
