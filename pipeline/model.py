"""`DePTModel`: a backbone with a `DePTPrompt` in front of it; the forward and generate every caller uses.

T5: the prompt and offset go on the encoder input only; decoder inputs and labels are untouched. LLaMA: the prompt
goes before the tokens (after any left padding) and the labels get -100 over it. Tokens are embedded by calling the
embedding *module*, so ZeRO-3 gathers its weight for the call; nothing here knows about DeepSpeed.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache

from pipeline import distributed
from pipeline.backbone import Backbone, embedding_rows
from pipeline.data import IGNORE
from pipeline.dept import DeptConfig, DePTPrompt, init_prompt_, prompt_init_ids


class DePTModel(nn.Module):
    """`base_model` (a transformers seq2seq or causal LM) with `prompt` in front, or none (the finetune method, or a
    backbone whose own modules carry the adapter)."""

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

    def forward(self, input_ids, attention_mask, labels=None, decoder_input_ids=None, loss_denominator=None):
        """input_ids/attention_mask: [batch, L]; labels: [batch, T] (T5 targets) or [batch, L] (LLaMA).
        Returns the backbone's output (logits [batch, T or m + L, vocab]) with `loss` when labels are given.

        The loss is the *sum* of the target tokens' cross-entropies (in fp32, whatever the model's precision)
        divided by `loss_denominator`, by default this batch's own number of target tokens (`count_targets`), which
        makes it the token mean. Training passes a denominator derived from the whole global batch (see
        `train._optimizer_step`), so that the gradient does not depend on how the batch is split.
        """
        embeds, mask, labels = self._inputs(input_ids, attention_mask, labels)
        kwargs = {}
        if labels is not None and self.is_encoder_decoder and decoder_input_ids is None:
            decoder_input_ids = self._decoder_inputs(labels)
        if decoder_input_ids is not None:
            kwargs["decoder_input_ids"] = decoder_input_ids
        out = self.base_model(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        if labels is not None:
            # decoder-only: the logits at t predict the token at t + 1
            targets = labels if self.is_encoder_decoder else nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
            summed = nn.functional.cross_entropy(
                out.logits.float().flatten(0, 1),
                targets.flatten().to(out.logits.device),
                ignore_index=IGNORE,
                reduction="sum",
            )
            denominator = loss_denominator if loss_denominator is not None else max(int(targets.ne(IGNORE).sum()), 1)
            out.loss = summed / denominator
        return out

    def count_targets(self, labels: torch.Tensor) -> int:
        """Target tokens of a batch's labels (as collated: [batch, T] or [batch, L]): the tokens the loss is taken
        on. Decoder-only without a prompt: column 0 is never predicted (nothing precedes it); with a prompt, the
        prompt (or a left pad) precedes every sequence, so every label counts."""
        count = int(labels.ne(IGNORE).sum())
        if not self.is_encoder_decoder and (self.prompt is None or self.prompt.config.num_virtual_tokens == 0):
            count -= int(labels[:, 0].ne(IGNORE).sum())
        return count

    def _decoder_inputs(self, labels: torch.Tensor) -> torch.Tensor:
        """T5's teacher-forcing inputs: the labels shifted right behind the decoder start token, pads for -100
        (what T5ForConditionalGeneration does itself when given labels)."""
        config = self.base_model.config
        shifted = labels.new_full(labels.shape, config.decoder_start_token_id)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted.eq(IGNORE), config.pad_token_id)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, max_new_tokens: int = 20, synced_gpus: bool = False):
        """Greedy generation; returns only the new tokens [batch, <= max_new_tokens] (finished rows padded).

        `synced_gpus` must be True under ZeRO-3 with several ranks: every rank keeps stepping until all are done,
        otherwise the parameter gathers deadlock. T5: transformers' `generate` (the prompt and offset are on the
        encoder input, which it encodes once). Decoder-only: `_greedy_decoder_only`, which gives generated tokens
        their offset rows as training does.
        """
        if not self.is_encoder_decoder:
            return self._greedy_decoder_only(input_ids, attention_mask, max_new_tokens, synced_gpus)
        embeds, mask, _ = self._inputs(input_ids, attention_mask)
        out = self.base_model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            synced_gpus=synced_gpus,
        )
        return out[:, 1:]  # T5 output starts with the decoder start token

    def _greedy_decoder_only(self, input_ids, attention_mask, max_new_tokens: int, synced: bool) -> torch.Tensor:
        """Greedy decoding with the KV cache that equals, token by token, the argmax of the training-time forward
        run on the source plus the tokens generated so far.

        input_ids/attention_mask: [batch, L], left-padded (`collate(..., for_generation=True)`). Training adds DePT's
        offset row `(A @ B)[i]` to the token at index i < s of its sequence, answer tokens included (as the
        authors do), so each generated token is embedded as `embed(token) + scale * (A @ B)[i]` too, by the DePT
        module's own forward (where ZeRO-3 gathers A and B). Positions follow each row's own tokens (left pads
        excluded), as in the right-padded training forward. Under ZeRO-3 with several ranks (`synced`) every rank
        runs the same number of forward calls: a rank whose rows are done keeps stepping until every rank is.
        """
        if max_new_tokens < 1:
            return input_ids.new_zeros((len(input_ids), 0))
        eos, pad = _stop_ids(self.base_model, input_ids.device)
        embeds, mask, _ = self._inputs(input_ids, attention_mask)
        next_index = attention_mask.to(torch.long).sum(dim=1)  # index of the next token within its own sequence
        positions = (mask.to(torch.long).cumsum(dim=1) - 1).clamp(min=0)  # rotary positions: pads excluded
        cache = {_cache_argument(self.base_model): DynamicCache(config=self.base_model.config)}  # filled in place
        out = self.base_model(  # the logits of the last position only, as transformers' generate asks
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **cache
        )
        next_position = positions[:, -1] + 1
        done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        generated = []
        for step in range(max_new_tokens):
            token = out.logits[:, -1].argmax(dim=-1)
            token = torch.where(done, torch.full_like(token, pad), token)
            generated.append(token)
            done |= torch.isin(token, eos)
            all_done = bool(done.all())
            if step == max_new_tokens - 1 or (distributed.all_ranks(all_done) if synced else all_done):
                break
            new_embeds = self.base_model.get_input_embeddings()(token[:, None])
            ones = torch.ones_like(token[:, None], dtype=mask.dtype)
            if self.prompt is not None:
                new_embeds, _, _ = self.prompt(new_embeds, ones, first_position=next_index)
            mask = torch.cat([mask, ones], dim=1)
            out = self.base_model(
                inputs_embeds=new_embeds,
                attention_mask=mask,
                position_ids=next_position[:, None],
                use_cache=True,
                **cache,
            )
            next_index, next_position = next_index + 1, next_position + 1
        return torch.stack(generated, dim=1)


def _cache_argument(model: nn.Module) -> str:
    """The name under which the model's forward takes its KV cache: `cache` in transformers >= 5.24
    (`past_key_values` is deprecated there, to be removed in 5.40), `past_key_values` before."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper forwards kwargs
    return "cache" if "cache" in inspect.signature(type(inner).forward).parameters else "past_key_values"


def _stop_ids(model: nn.Module, device: torch.device) -> tuple[torch.Tensor, int]:
    """(end-of-sequence ids, the id finished rows are padded with) from the model's generation config."""
    config = getattr(model, "generation_config", None) or model.config
    eos = config.eos_token_id if config.eos_token_id is not None else model.config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    pad = config.pad_token_id if config.pad_token_id is not None else model.config.pad_token_id
    pad = pad if pad is not None else (eos[0] if eos else 0)
    return torch.tensor(eos, dtype=torch.long, device=device), pad


def init_dept_prompt(config: DeptConfig, backbone: Backbone, seed: int) -> DePTPrompt:
    """A new DePT module for `backbone`: A drawn with `seed` (the same on every rank), the prompt from the frozen
    embeddings of the init text's tokens (TEXT), of random vocabulary rows (VOCAB), or U(-0.5, 0.5) (RANDOM)."""
    torch.manual_seed(seed)
    prompt = DePTPrompt(config)
    vocab = backbone.model.get_input_embeddings().num_embeddings
    ids = prompt_init_ids(config, backbone.tokenizer, vocab, seed)
    init_prompt_(prompt, None if ids is None else embedding_rows(backbone, ids), seed)
    return prompt
