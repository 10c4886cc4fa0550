"""The default policy: a tiny randomly initialised Llama-architecture causal LM and its own BPE tokenizer.

``rlhf bootstrap`` publishes it as the first policy version so the whole loop runs on one CPU with
nothing downloaded. It is Llama on purpose: vLLM, transformers and the trainer all support that
architecture natively, so the same safetensors directory serves, trains and hot-swaps everywhere.

    store = ModelStore(cfg.model_store.root)
    version = ensure_default_policy(store)     # "policy-0001" on the first call, a no-op afterwards

Chat format (``<|end|>`` is the EOS token, so generation stops at the end of the assistant turn):

    <|bos|><|system|>\\n{system}<|end|>\\n<|user|>\\n{question}<|end|>\\n<|assistant|>\\n{answer}<|end|>\\n
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from shared.logging import get_logger, log_event
from shared.model_store import PICKLE_SUFFIXES, ModelStore
from shared.signing import SigningKey
from shared.version_line import POLICY, VersionLine

log = get_logger(__name__)

DEFAULT_CORPUS = Path(__file__).parents[1] / "data" / "corpus.txt"

BOS, DOC_END, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
# Order fixes the ids: 0 bos, 1 eos (end of a plain-text document), 2 pad, 3..6 chat markers.
SPECIAL_TOKENS = [BOS, DOC_END, PAD, SYSTEM, USER, ASSISTANT, END]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# Head sizes vLLM's CPU attention backend has kernels for (vllm/v1/attention/backends/cpu_attn.py).
VLLM_CPU_HEAD_DIMS = frozenset({32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512})


@dataclass(frozen=True)
class DefaultModelSpec:
    """Shape of the default model; small enough to train on a laptop CPU, large enough to learn the corpus."""

    vocab_size: int = 2048
    """Target BPE vocabulary size, special tokens included; the model's embedding matches the trained tokenizer."""
    hidden_size: int = 128
    """Width of the residual stream."""
    intermediate_size: int = 384
    """Width of the SwiGLU feed-forward layer."""
    num_layers: int = 2
    """Number of transformer blocks."""
    num_heads: int = 2
    """Attention heads; head_dim = hidden_size / num_heads must be a size vLLM's CPU attention supports."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention when fewer than num_heads)."""
    max_position_embeddings: int = 1024
    """Longest sequence (prompt + completion) in tokens."""
    seed: int = 0
    """torch seed of the random initialisation: the same spec gives the same weights."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid DefaultModelSpec: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def problems(self) -> list[str]:
        out = []
        # Byte-level BPE starts from 256 byte tokens plus the specials; smaller would mean no merges.
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            out.append(f"vocab_size {self.vocab_size} is below {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
        if min(self.hidden_size, self.intermediate_size, self.num_layers, self.num_heads, self.num_kv_heads) < 1:
            out.append("sizes, layer and head counts must be positive")
        elif self.hidden_size % self.num_heads:
            out.append(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        elif self.head_dim not in VLLM_CPU_HEAD_DIMS:
            supported = sorted(VLLM_CPU_HEAD_DIMS)
            out.append(f"head_dim {self.head_dim} is not supported by vLLM's CPU attention {supported}")
        elif self.num_heads % self.num_kv_heads:
            out.append(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        return out


def train_tokenizer(corpus_path: Path, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus_path``, with the chat special tokens and template."""
    tokenizer = Tokenizer(models.BPE())
    # Digits one by one: a tiny model learns arithmetic far more easily than with merged numbers.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, even if unseen
        show_progress=False,
    )
    tokenizer.train([str(corpus_path)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=END,
        pad_token=PAD,
        additional_special_tokens=[DOC_END, SYSTEM, USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
    )


def create_default_model(
    out_dir: Path, spec: DefaultModelSpec = DefaultModelSpec(), corpus_path: Path = DEFAULT_CORPUS
) -> int:
    """Write the default model and its tokenizer to ``out_dir`` (safetensors only); returns the parameter count."""
    started = time.monotonic()
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(corpus_path, spec.vocab_size)
    tokenizer.model_max_length = spec.max_position_embeddings
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype=torch.float32,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)  # safetensors is the only (transformers 5) / default (4.x) format
    tokenizer.save_pretrained(out_dir)
    pickled = [p.name for p in out_dir.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise RuntimeError(f"save_pretrained wrote pickle files {pickled}; the model store would refuse them")
    n_params = sum(p.numel() for p in model.parameters())
    log_event(
        log,
        "created default model",
        dir=str(out_dir),
        params=n_params,
        vocab=len(tokenizer),
        seconds=round(time.monotonic() - started, 2),
    )
    return n_params


def ensure_default_policy(
    store: ModelStore,
    spec: DefaultModelSpec = DefaultModelSpec(),
    corpus_path: Path = DEFAULT_CORPUS,
    *,
    signer: SigningKey | None = None,
) -> str:
    """Publish the default model as the first policy version unless the store has one, signed with
    ``signer`` (the policy line's key; None: unsigned); returns the current policy."""
    if not store.versions("policy"):
        log_event(log, "no policy in the model store: creating the default model", store=str(store.root))
        with tempfile.TemporaryDirectory(prefix="rlhf-default-model-") as tmp:
            n_params = create_default_model(Path(tmp), spec, corpus_path)
            manifest = VersionLine(store, POLICY, signer=signer).publish(
                Path(tmp), metrics={"params": n_params}, extra={"kind": "default-random-init"}
            )
        log_event(log, "published default policy", version=manifest.version, params=n_params)
    current = store.current("policy")
    assert current is not None  # a policy version exists by now
    return current
