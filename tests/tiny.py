"""Tiny random models and a small trained tokenizer, built offline in well under a second."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SPECIAL = ["<|endoftext|>", "<think>", "</think>", "<|im_start|>", "<|im_end|>", "<|start|>",
           "<|channel|>", "<|message|>", "<|end|>", "<|return|>"]

CORPUS = [
    "Question: what is 2+2? Reasoning: First, we add the two numbers together. Answer: 4.",
    "The total cost is 3 times 4, which is 12 dollars. Next, I subtract the cost from the amount.",
    "He paid with a 20 dollar bill, so the change is 20 minus 12. That gives 8 dollars of change.",
    "Let me check the sum again carefully. So the answer must be four, clearly and surely.",
    "| a | b |\n|---|---|\n| 1 | 2 |\n12. 3.5 - 7, 8.",
]

THINK_TRACE = (
    "<|im_start|>user\nWhat is 2+2 and then times 3?<|im_end|>\n<|im_start|>assistant\n"
    "<think>\nFirst, we add the two numbers together. The sum of 2 and 2 is 4. "
    "Then we multiply the sum by 3 to get 12. Let me check the product again.\n</think>\n"
    "The sum is 4 and the product is 12.\n\nSo the answer is 12.<|im_end|>"
)


def make_tokenizer(folder) -> PreTrainedTokenizerFast:
    """A byte-level BPE (vocab 400) saved to ``folder`` and reloaded (TransformerLens needs a name)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL[1:])
    fast.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def make_hf_model(arch: str, vocab: int, n_layers: int = 2, seed: int = 0):
    """A random transformers causal LM with eager attention (the reference for hook_pattern)."""
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
        model = LlamaForCausalLM(config)
    elif arch == "qwen2":  # grouped KV heads: 4 query heads share 2 KV heads
        config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        model = Qwen2ForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=n_layers, n_head=4, n_positions=512)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(arch)
    model.config._attn_implementation = "eager"
    return model.eval()


def make_opt_bridge(tokenizer):
    """OPT booted straight into a TransformerBridge (not through load_model): its adapter computes
    attention inside transformers, so edits to hook_pattern never reach the output."""
    import warnings

    from transformer_lens.model_bridge import TransformerBridge
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                                   num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers("opt", hf_model=opt.eval(), tokenizer=tokenizer)


def save_folder(folder, model, tokenizer):
    """A model and its tokenizer saved as load_model's folder source; returns the folder."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@dataclass(frozen=True)
class TextProblem:
    """A problem whose prompt is already in chat form (the tiny tokenizer has no chat template)."""
    id: str
    answer: int

    def messages(self) -> str:
        return f"<|im_start|>user\nWhat is {self.answer}?<|im_end|>\n<|im_start|>assistant\n<think>\n"


def fake_generation(tokenizer, texts: list[str]) -> SimpleNamespace:
    """What stepsal.generate returns for ``texts`` continuing a prompt that opened the thinking (for
    tests that stand in for generation)."""
    prompt = tokenizer("<|im_start|>assistant\n<think>\n")["input_ids"]
    tokens = [torch.tensor(prompt + tokenizer(text)["input_ids"]) for text in texts]
    return SimpleNamespace(texts=texts, tokens=tokens, prompt_lengths=[len(prompt)] * len(texts), stats=None)
