"""The prompted teacher: a frozen teacher LM with trainable soft-prompt vectors in front.

`PromptedTeacher` owns every soft-prompt detail of PromptKD (docs/method.md, sections 3-4): the PEFT
prompt-tuning adapter, its initialisation from text / pad / random, the forward that drops
the virtual positions so teacher logits align with the student's, the un-prompted forward
used by the regulariser, and saving the prompt as a standard PEFT adapter.

    prompted = PromptedTeacher(teacher, tokenizer, num_virtual_tokens=7)
    teacher_logits = prompted(batch.input_ids, batch.attention_mask)       # (B, T, V)
    base_logits = prompted.forward_base(batch.input_ids, batch.attention_mask)
    optimizer = torch.optim.AdamW(prompted.prompt_parameters(), lr=5e-5, weight_decay=0.01)
    prompted.save_adapter("out/prompt")   # PeftModel.from_pretrained(teacher, "out/prompt")

Why not PEFT's own forward: `PeftModelForCausalLM.forward` discards `position_ids` (with a
warning), so every column, pads included, gets position arange(n + T) and a left-padded
prompt shifts its real tokens' positions by the pad count. Here the forward is done through
`inputs_embeds` with the attention mask extended by n ones and position ids
`cumsum(mask) - 1` (docs/conventions.md): the virtual tokens sit at 0..n-1 and the real
tokens at n, n+1, ... however much left padding a row has. On unpadded rows this is exactly
PEFT's forward.
"""

from __future__ import annotations

import math
import warnings
from enum import Enum
from pathlib import Path

import torch

from promptkd.data.batch import position_ids_from_mask
from promptkd.errors import UserError
from promptkd.models.sharding import gather_root

DEFAULT_INIT_TEXT = "Suppose you are a student."
PROMPT_KEY = "prompt_embeddings"  # the key PEFT uses for prompt-tuning weights


class PromptInit(str, Enum):
    """How the soft prompt starts: embeddings of `init_text`, of the pad token, or random."""

    TEXT = "text"
    PAD = "pad"
    RANDOM = "random"


def prompt_init_ids(tokenizer, init_text: str, num_virtual_tokens: int) -> list[int]:
    """Token ids of `init_text` (default special tokens), tiled or cut to `num_virtual_tokens`."""
    ids = list(tokenizer(init_text)["input_ids"])
    if not ids:
        raise UserError(
            f"prompt init text {init_text!r} tokenizes to no tokens: give a non-empty text"
        )
    return (ids * math.ceil(num_virtual_tokens / len(ids)))[:num_virtual_tokens]


def _checkpointing_layers(model) -> list[torch.nn.Module]:
    """Modules whose forward checks `self.gradient_checkpointing and self.training`."""
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]


def _positions_to_keep(logits_to_keep: int, length: int) -> int:
    """How many trailing positions get logits: K clipped to 1..T; 0 (or K >= T) = all T."""
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise UserError(
            f"logits_to_keep must be a non-negative integer (0 = every position), got {logits_to_keep!r}"
        )
    return length if logits_to_keep == 0 else min(logits_to_keep, length)


class PromptedTeacher(torch.nn.Module):
    """A frozen causal LM with `num_virtual_tokens` trainable prompt vectors prepended.

    Args:
        teacher: a transformers causal LM; it is frozen in place (requires_grad False) and
            wrapped with PEFT prompt tuning (`get_peft_model`), which leaves its modules as is.
        tokenizer: the teacher's tokenizer (used for the text / pad initialisation).
        num_virtual_tokens: prompt length n (the paper: 7).
        init: "text" (teacher input embeddings of `init_text`'s ids, tiled / cut to n),
            "pad" (the pad token's embedding n times) or "random" (PEFT's random init).
        init_text: the text for init="text".
        dropout: run the teacher in train mode (dropout on) for forwards that record
            gradients, i.e. the prompt update, as the reference code does. Forwards under
            `torch.no_grad()` and `forward_base` always run in eval mode.
        gradient_checkpointing: recompute the teacher's decoder layers in the backward pass.
            The prompt still gets gradients: it enters through `inputs_embeds`, so the
            hidden states entering each checkpointed layer require grad (non-reentrant
            checkpointing). With dropout off, only the decoder-layer modules are flagged as
            training (transformers checkpoints a layer only when it is), their submodules
            stay in eval mode.

    The prompt is stored in float32 whatever the teacher's dtype and cast to it per forward.
    The wrapper's own train()/eval() do not touch the teacher: its mode is set per forward.

    Raises:
        UserError: num_virtual_tokens < 1, an unknown init, an init text with no tokens,
        init="pad" without a pad token, or gradient_checkpointing with dropout off on an
        architecture whose layers apply dropout themselves (OPT).
    """

    def __init__(
        self,
        teacher,
        tokenizer,
        num_virtual_tokens: int = 7,
        init: PromptInit | str = PromptInit.TEXT,
        init_text: str = DEFAULT_INIT_TEXT,
        dropout: bool = False,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

        if (
            isinstance(num_virtual_tokens, bool)
            or not isinstance(num_virtual_tokens, int)
            or num_virtual_tokens < 1
        ):
            raise UserError(
                f"num_virtual_tokens must be a positive integer, got {num_virtual_tokens!r}"
            )
        try:
            init = PromptInit(init)
        except ValueError:
            raise UserError(
                f"prompt init {init!r} is not one of {[i.value for i in PromptInit]}"
            ) from None
        self.num_virtual_tokens = num_virtual_tokens
        self.dropout = bool(dropout)
        self.gradient_checkpointing = bool(gradient_checkpointing)

        teacher.requires_grad_(False)
        # RANDOM here because PEFT's TEXT init re-loads a tokenizer by name; the text / pad
        # init is written into the same parameter below.
        config = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.RANDOM,
        )
        with warnings.catch_warnings():
            # peft 0.21 calls transformers' deprecated `is_gradient_checkpointing`.
            warnings.filterwarnings(
                "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
            )
            self.peft_model = get_peft_model(teacher, config)
        weight = self._prompt_weight
        with torch.no_grad():
            weight.data = weight.data.to(torch.float32)
            gather_root(teacher)
            embed = teacher.get_input_embeddings()
            device = embed.weight.device
            if init is PromptInit.TEXT:
                ids = torch.tensor(
                    prompt_init_ids(tokenizer, init_text, num_virtual_tokens), device=device
                )
                weight.copy_(embed(ids).float())
            elif init is PromptInit.PAD:
                if tokenizer.pad_token_id is None:
                    raise UserError(
                        "prompt init 'pad' needs a tokenizer with a pad token; this one has none"
                    )
                ids = torch.full((num_virtual_tokens,), tokenizer.pad_token_id, device=device)
                weight.copy_(embed(ids).float())
        if self.gradient_checkpointing:
            self._enable_gradient_checkpointing()
        teacher.eval()

    # ----------------------------------------------------------------- parameters
    @property
    def teacher(self):
        """The wrapped (frozen) base model."""
        return self.peft_model.get_base_model()

    @property
    def _prompt_weight(self) -> torch.nn.Parameter:
        return self.peft_model.prompt_encoder[self.peft_model.active_adapter].embedding.weight

    def prompt_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters: one (num_virtual_tokens, hidden) float32 tensor."""
        return [self._prompt_weight]

    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        """{"prompt_embeddings": (n, H) float32 copy} for training checkpoints."""
        return {PROMPT_KEY: self._prompt_weight.detach().clone()}

    def load_prompt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Restore the prompt in place (optimizers keep their reference to the parameter)."""
        weight = self._prompt_weight
        if PROMPT_KEY not in state_dict:
            raise UserError(
                f"prompt state dict has keys {sorted(state_dict)}; expected {PROMPT_KEY!r}"
            )
        value = state_dict[PROMPT_KEY]
        if tuple(value.shape) != tuple(weight.shape):
            raise UserError(
                f"saved prompt has shape {tuple(value.shape)} but this teacher's prompt is "
                f"{tuple(weight.shape)} (num_virtual_tokens, hidden size): use the same teacher "
                "and num_virtual_tokens"
            )
        with torch.no_grad():
            weight.copy_(value.to(device=weight.device, dtype=weight.dtype))

    # ----------------------------------------------------------------- modes
    def train(self, mode: bool = True):
        """Set the wrapper's flag only; the teacher's mode is chosen per forward."""
        self.training = mode
        return self

    def _set_teacher_mode(self, train: bool) -> None:
        teacher = self.teacher
        teacher.train(train)
        if self.gradient_checkpointing and not train and torch.is_grad_enabled():
            # transformers only checkpoints modules that are training; flag just those so
            # their dropout submodules stay off.
            for module in _checkpointing_layers(teacher):
                module.training = True

    def _enable_gradient_checkpointing(self) -> None:
        teacher = self.teacher
        if not self.dropout:
            # A layer that applies functional dropout itself (e.g. OPT) would turn it on
            # once flagged as training; refuse rather than silently add dropout.
            for module in teacher.modules():
                rate = getattr(module, "dropout", None)
                if (
                    type(rate) is float
                    and rate > 0
                    and getattr(module, "gradient_checkpointing", None) is not None
                ):
                    raise UserError(
                        f"gradient_checkpointing with dropout off is not supported for "
                        f"{type(module).__name__} (its layers apply dropout {rate} themselves): "
                        "set dropout=True or turn gradient checkpointing off"
                    )
        kwargs = {"use_reentrant": False}
        if hasattr(teacher, "activation_checkpointing_enable"):  # transformers >= 5.x name
            teacher.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            teacher.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        # The embedding-output hook transformers adds is only needed for reentrant
        # checkpointing with frozen inputs; here the prompt already requires grad.
        if hasattr(teacher, "disable_input_require_grads"):
            teacher.disable_input_require_grads()

    # ----------------------------------------------------------------- forwards
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 0
    ) -> torch.Tensor:
        """Prompted-teacher logits aligned with the input positions.

        Args:
            input_ids: (B, T) long, prompts left-padded.
            attention_mask: (B, T), 1 on real tokens.
            logits_to_keep: K in 1..T: logits only for the last K input positions (the LM head,
                a (H, V) matmul per position, runs on those only; what is kept is exactly the
                same as slicing the full output). 0 (default) or K >= T: all T positions.
                The virtual positions never go through the LM head.
        Returns:
            (B, T, V) logits in the teacher's dtype, or (B, K, V) for the last K positions;
            position t predicts token t+1, exactly like the student's logits on the same
            batch (virtual positions dropped).
        """
        teacher = self.teacher
        n = self.num_virtual_tokens
        batch_size, length = input_ids.shape
        keep = _positions_to_keep(logits_to_keep, length)
        self._set_teacher_mode(self.dropout and torch.is_grad_enabled())
        # a sharded (FSDP2) teacher gathers its embeddings in its own forward only: gather them first
        gather_root(teacher)
        token_embeds = teacher.get_input_embeddings()(input_ids)  # (B, T, H)
        prompt = self.peft_model.get_prompt(batch_size=batch_size)  # (B, n, H) float32
        prompt = prompt.to(device=token_embeds.device, dtype=token_embeds.dtype)
        inputs_embeds = torch.cat([prompt, token_embeds], dim=1)  # (B, n + T, H)
        mask = torch.cat(
            [attention_mask.new_ones(batch_size, n), attention_mask], dim=1
        )  # (B, n + T)
        out = teacher(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=False,
            logits_to_keep=keep,  # the last `keep` of n + T positions: all real ones
        )
        return out.logits  # (B, keep, V)

    @torch.no_grad()
    def forward_base(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 0
    ) -> torch.Tensor:
        """The teacher without the prompt (eval mode, no grad): (B, T) -> (B, T, V) logits.

        `logits_to_keep` as in `forward`: (B, K, V) logits of the last K positions.
        """
        self._set_teacher_mode(False)
        return self.teacher(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
            logits_to_keep=_positions_to_keep(logits_to_keep, input_ids.shape[1]),
        ).logits

    # ----------------------------------------------------------------- adapters
    def save_adapter(self, out_dir: str | Path) -> Path:
        """Save the prompt as a PEFT adapter (adapter_config.json + adapter_model.safetensors).

        Loads back with `PeftModel.from_pretrained(teacher, out_dir)` or `load_adapter`.
        """
        out_dir = Path(out_dir)
        # A prompt never changes the embedding matrix; "auto" would look the base model up on
        # the Hub (network) to check for a resized vocabulary.
        self.peft_model.save_pretrained(str(out_dir), save_embedding_layers=False)
        return out_dir

    def load_adapter(self, adapter_dir: str | Path) -> None:
        """Restore the prompt saved by `save_adapter` (in place, exactly)."""
        from peft import PeftConfig, PeftType
        from peft.utils import load_peft_weights

        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise UserError(
                f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json): give "
                "a directory written by PromptedTeacher.save_adapter"
            )
        config = PeftConfig.from_pretrained(str(adapter_dir))
        if config.peft_type != PeftType.PROMPT_TUNING:
            raise UserError(
                f"adapter {adapter_dir} is {config.peft_type}, not a prompt-tuning adapter"
            )
        if config.num_virtual_tokens != self.num_virtual_tokens:
            raise UserError(
                f"adapter {adapter_dir} has num_virtual_tokens={config.num_virtual_tokens} but this "
                f"prompted teacher has {self.num_virtual_tokens}: build it with the adapter's length"
            )
        weights = load_peft_weights(str(adapter_dir), device="cpu")
        self.load_prompt_state_dict(weights)
