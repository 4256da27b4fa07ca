"""The DePT module: a short soft prompt plus a low-rank positional offset on the input embeddings.

Decomposed Prompt Tuning (Shi & Lipani, ICLR 2024) spends the budget of a vanilla prompt of `l` vectors on a
prompt of `m` vectors and a pair `A [s, r]`, `B [r, d]` whose product offsets the frozen token embeddings,
row `i` of `A @ B` going to the token at position `i` of its own sequence:

    E = embed(input_ids) + scale * (A @ B)[position_in_sequence]      # [batch, L, d], L <= s
    x = concat(P, E)                                                    # [batch, m + L, d]

Vanilla prompt tuning is this module with `r = 0`. The module knows nothing of DeepSpeed: under ZeRO-3 its
parameters are gathered by the engine's hooks around `forward`, which is why the offset is computed here
and nowhere else (reading `lora_A` outside `forward` gives a 0-element tensor under ZeRO-3).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from pipeline.config import AUTHORS_INIT_TEXT, DEFAULT_M, DEFAULT_R, DEFAULT_S, PROMPT_INITS
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

DEFAULT_INIT_TEXT = AUTHORS_INIT_TEXT


@dataclass
class DeptConfig:
    """Shape and initialisation of one DePT adapter."""

    num_virtual_tokens: int = field(default=DEFAULT_M, metadata={"help": "m: prompt length (0 allowed if r > 0)"})
    r: int = field(default=DEFAULT_R, metadata={"help": "rank of the offset A @ B; 0 = vanilla prompt tuning"})
    max_length: int = field(default=DEFAULT_S, metadata={"help": "s: rows of A, the longest input that gets an offset"})
    d_model: int = field(default=768, metadata={"help": "d: the backbone's embedding width"})
    lora_alpha: float = field(default=8.0, metadata={"help": "offset scale is lora_alpha / sqrt(r)"})
    prompt_init: str = field(default="TEXT", metadata={"help": "TEXT | VOCAB | RANDOM"})
    init_text: str = field(default=DEFAULT_INIT_TEXT, metadata={"help": "text whose embeddings seed TEXT init"})

    def __post_init__(self):
        for name in ("num_virtual_tokens", "r", "max_length", "d_model"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise PipelineError(f"DePT {name} must be a non-negative integer, got {value!r}")
        if self.max_length < 1 or self.d_model < 1:
            raise PipelineError(
                f"DePT max_length (s={self.max_length}) and d_model (d={self.d_model}) must be at least 1"
            )
        if self.num_virtual_tokens == 0 and self.r == 0:
            raise PipelineError("DePT with m = 0 and r = 0 has nothing to train: set m (prompt length) or r > 0")
        if self.r > min(self.max_length, self.d_model):
            raise PipelineError(
                f"DePT rank r={self.r} exceeds min(s={self.max_length}, d={self.d_model}); "
                "a larger rank adds parameters but no expressiveness: lower r"
            )
        self.prompt_init = str(self.prompt_init).upper()
        if self.prompt_init not in PROMPT_INITS:
            raise PipelineError(f"prompt_init must be one of {', '.join(PROMPT_INITS)}, got {self.prompt_init!r}")
        if not self.lora_alpha > 0:
            raise PipelineError(f"lora_alpha must be positive, got {self.lora_alpha}")

    @property
    def scale(self) -> float:
        """rsLoRA-style scale alpha / sqrt(r) used in every published DePT run (not alpha / r)."""
        return self.lora_alpha / math.sqrt(self.r) if self.r > 0 else 0.0

    @property
    def num_trainable(self) -> int:
        return count_trainable(self.num_virtual_tokens, self.r, self.max_length, self.d_model)

    def to_dict(self) -> dict:
        return asdict(self)


def count_trainable(m: int, r: int, s: int, d: int) -> int:
    """Parameters of a DePT adapter: m*d (prompt) + s*r (A) + r*d (B)."""
    return m * d + s * r + r * d


def rank_for_budget(l: int, m: int, s: int, d: int) -> int:
    """The rank `r` that spends the budget of a vanilla prompt of `l` tokens on a prompt of `m` tokens.

    Solves m*d + s*r + r*d = l*d, i.e. r = (l - m) * d / (s + d), rounded down so the budget is never exceeded.
    T5-base (d=768, s=256, l=100): m=60 -> 30, m=40 -> 45, m=80 -> 15, m=0 -> 75.
    """
    if min(l, m, s, d) < 0 or s == 0 or d == 0:
        raise PipelineError(f"budget needs l, m >= 0 and s, d >= 1 (got l={l}, m={m}, s={s}, d={d})")
    if m > l:
        raise PipelineError(
            f"budget cannot be met: a prompt of m={m} tokens alone exceeds the budget of l={l} tokens; choose m <= l"
        )
    return (l - m) * d // (s + d)


class DePTPrompt(nn.Module):
    """Trainable DePT tensors and the forward that applies them to already-embedded tokens.

    Parameters: `prompt` [m, d] (absent when m = 0), `lora_A` [s, r], `lora_B` [r, d] (absent when r = 0).
    """

    def __init__(self, config: DeptConfig):
        super().__init__()
        self.config = config
        m, r, s, d = config.num_virtual_tokens, config.r, config.max_length, config.d_model
        if m > 0:
            self.prompt = nn.Parameter(torch.zeros(m, d))
        else:  # no 0-element parameter: ZeRO-3 on several ranks cannot partition one
            self.register_parameter("prompt", None)
        if r > 0:
            self.lora_A = nn.Parameter(torch.empty(s, r))
            self.lora_B = nn.Parameter(torch.zeros(r, d))
            # kaiming_uniform_(a=sqrt(5)) on an [s, r] tensor draws from U(-1/sqrt(r), 1/sqrt(r)); B = 0 makes
            # A @ B = 0 at step 0, so DePT starts exactly as prompt tuning with m tokens.
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            self.register_parameter("lora_A", None)
            self.register_parameter("lora_B", None)
        self._warned_truncation = False

    def prompt_parameters(self) -> list[nn.Parameter]:
        return [self.prompt] if self.config.num_virtual_tokens > 0 else []

    def lowrank_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B] if self.config.r > 0 else []

    def param_groups(self, lr_prompt: float, lr_lowrank: float, prefix: str = "") -> list[dict]:
        """The optimizer groups of DePT's two learning rates: `prompt` [m, d] and `lowrank` (A, B); a group whose
        tensors do not exist (m = 0, r = 0) is left out. `prefix` goes before the names (several modules)."""
        groups = []
        if self.prompt_parameters():
            groups.append({"name": f"{prefix}prompt", "params": self.prompt_parameters(), "lr": lr_prompt})
        if self.lowrank_parameters():
            groups.append({"name": f"{prefix}lowrank", "params": self.lowrank_parameters(), "lr": lr_lowrank})
        return groups

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        first_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Offset the token embeddings and insert the prompt right before each sequence's first real token.

        inputs_embeds: [batch, L, d] frozen embeddings of the tokens; attention_mask: [batch, L] (1 = token);
        labels: optional [batch, L] (decoder-only LMs), -100 where no loss is taken.
        Returns (embeds [batch, m + L, d], mask [batch, m + L], labels [batch, m + L] or None); the prompt
        gets mask 1 and label -100. Padding may be on either side: the offset row follows each token's index
        within its own sequence, and with left padding the prompt goes after the pads, not before them.

        first_position: [batch], for tokens that continue sequences already started (greedy decoding with a KV
        cache): the first of the L tokens sits at that index of its own sequence. They get the offset rows of
        their positions, exactly as in the training-time forward of the whole sequence, and no prompt (it is in
        the cache already): returns (embeds [batch, L, d], attention_mask, labels).
        """
        cfg = self.config
        mask = attention_mask.to(torch.long)
        # Index of every token within its own sequence (pads get -1), whatever the padding side.
        positions = torch.cumsum(mask, dim=1) - 1
        continuing = first_position is not None
        if continuing:
            positions = positions + first_position.to(positions.device).unsqueeze(1)
        if cfg.r > 0:
            too_long = positions >= cfg.max_length
            if bool(too_long.any()) and not continuing:  # decoding past s is expected: those tokens get no offset
                # The data pipeline truncates to s; this guard keeps a direct caller from crashing on A's rows.
                if not self._warned_truncation:
                    log.warning(
                        "input longer than max_length s=%d: tokens past it get no offset; truncate inputs to s",
                        cfg.max_length,
                    )
                    self._warned_truncation = True
            offset = (self.lora_A @ self.lora_B) * cfg.scale  # [s, d]
            rows = positions.clamp(min=0, max=cfg.max_length - 1)
            keep = (mask.bool() & ~too_long).unsqueeze(-1).to(inputs_embeds.dtype)
            inputs_embeds = inputs_embeds + offset.to(inputs_embeds.dtype)[rows] * keep

        m = cfg.num_virtual_tokens
        if m == 0 or continuing:
            return inputs_embeds, attention_mask, labels
        batch, length, _ = inputs_embeds.shape
        prompt = self.prompt.to(inputs_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        stacked = torch.cat([prompt, inputs_embeds], dim=1)  # prompt first, then the padded tokens
        order = _prompt_after_left_pads(mask, m)  # [batch, m + L] indices into `stacked`
        embeds = torch.gather(stacked, 1, order.unsqueeze(-1).expand(-1, -1, stacked.shape[-1]))
        full_mask = torch.cat([torch.ones(batch, m, dtype=attention_mask.dtype, device=mask.device), attention_mask], 1)
        full_mask = torch.gather(full_mask, 1, order)
        if labels is not None:
            ignore = torch.full((batch, m), -100, dtype=labels.dtype, device=labels.device)
            labels = torch.gather(torch.cat([ignore, labels], dim=1), 1, order)
        return embeds, full_mask, labels


def _prompt_after_left_pads(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Gather indices that turn [prompt, pads, tokens, pads] into [pads, prompt, tokens, pads].

    For output index j of a row with `n` leading pads: j < n -> a pad (stacked index m + j); n <= j < n + m ->
    prompt row j - n; otherwise the token at stacked index j. With right padding n = 0 and this is identity.
    """
    batch, length = mask.shape
    leading_pads = torch.cumsum(mask, dim=1).eq(0).sum(dim=1, keepdim=True)  # [batch, 1]
    j = torch.arange(m + length, device=mask.device).unsqueeze(0).expand(batch, -1)
    return torch.where(j < leading_pads, j + m, torch.where(j < leading_pads + m, j - leading_pads, j))


def prompt_init_ids(config: DeptConfig, tokenizer, vocab_size: int, seed: int) -> list[int] | None:
    """Token ids whose frozen embeddings seed the prompt: TEXT tiles the init text's ids to m rows (the
    authors' init, also for PT; tokenized with the tokenizer's special tokens as PEFT does, so T5's ids end with
    </s>), VOCAB samples m ids with `seed`, RANDOM needs none."""
    m = config.num_virtual_tokens
    if m == 0 or config.prompt_init == "RANDOM":
        return None
    if config.prompt_init == "VOCAB":
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (m,), generator=generator).tolist()
    ids = tokenizer(config.init_text)["input_ids"]
    if not ids:
        raise PipelineError(f"init_text {config.init_text!r} tokenizes to nothing: give a non-empty init_text")
    return (ids * math.ceil(m / len(ids)))[:m]


def init_prompt_(prompt_module: DePTPrompt, embed_rows: torch.Tensor | None, seed: int) -> None:
    """Fill the prompt in place with `embed_rows` [m, d] (read from the frozen embedding by the caller, gathered
    under ZeRO-3, for the ids of `prompt_init_ids`), or with U(-0.5, 0.5) drawn with `seed` when None."""
    cfg = prompt_module.config
    m = cfg.num_virtual_tokens
    if m == 0:
        return
    with torch.no_grad():
        if embed_rows is None:
            values = torch.rand(m, cfg.d_model, generator=torch.Generator().manual_seed(seed)) - 0.5
        elif tuple(embed_rows.shape) != (m, cfg.d_model):
            raise PipelineError(f"prompt init rows have shape {list(embed_rows.shape)}, expected [{m}, {cfg.d_model}]")
        else:
            values = embed_rows
        prompt_module.prompt.copy_(values.to(prompt_module.prompt.dtype))
