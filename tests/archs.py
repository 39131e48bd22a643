"""Tiny random configurations of the architectures reasoning researchers use (docs/models.md).

Each entry builds a transformers causal LM small enough to load, score and generate in about a
second on a CPU, keeping what makes the family distinct: grouped KV heads, sliding windows,
attention sinks, softcapping, MoE routers, MLA, hybrid linear attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


@dataclass(frozen=True)
class Arch:
    """One architecture: the transformers model type, what users know it as, and tiny settings."""

    name: str  # transformers model_type
    users: str  # the reasoning models built on it
    settings: dict[str, Any] = field(default_factory=dict)
    base: bool = True  # start from BASE


ARCHITECTURES = [
    Arch("llama", "R1-Distill-Llama-8B/70B, Llama 3", dict(num_key_value_heads=4)),
    Arch("qwen2", "R1-Distill-Qwen-1.5B..32B, QwQ-32B, Qwen2.5"),
    Arch("qwen3", "Qwen3 (thinking mode)", dict(head_dim=16)),
    Arch("qwen3_moe", "Qwen3-30B-A3B, Qwen3-235B-A22B",
         dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)),
    Arch("gpt_oss", "GPT-OSS-20B/120B (harmony)",
         dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
              layer_types=["sliding_attention", "full_attention"])),
    Arch("mistral", "Magistral, Mistral", dict(head_dim=16, sliding_window=None)),
    Arch("mixtral", "Mixtral", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2)),
    Arch("gemma2", "Gemma 2",
         dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
              final_logit_softcapping=30.0)),
    Arch("gemma3_text", "Gemma 3",
         dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
              layer_types=["sliding_attention", "full_attention"])),
    Arch("phi3", "Phi-4-mini-reasoning, Phi-3"),
    Arch("phi", "phi-2", dict(num_key_value_heads=4)),
    Arch("olmo2", "OLMo 2"),
    Arch("olmo3", "OLMo 3 Think",
         dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
    Arch("gpt2", "GPT-2 (teaching)", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512), base=False),
    Arch("gpt_neox", "Pythia, GPT-NeoX",
         dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=512), base=False),
    Arch("granite", "Granite 3.x"),
    Arch("smollm3", "SmolLM3 (think mode)", dict(no_rope_layers=[1, 1])),
    Arch("cohere2", "Command R7B / A (reasoning)",
         dict(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
    Arch("deepseek_v2", "DeepSeek-V2-Lite",
         dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
              n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
              n_group=1, topk_group=1, n_shared_experts=1, num_key_value_heads=4)),
    Arch("deepseek_v3", "DeepSeek-R1 / V3 (671B)",
         dict(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
              n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
              n_group=1, topk_group=1, n_shared_experts=1, num_key_value_heads=4)),
    Arch("bamba", "Bamba (hybrid Mamba-2)",
         dict(num_hidden_layers=4, attn_layer_indices=[0, 3], mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1,
              mamba_d_state=8, mamba_chunk_size=16)),
    Arch("falcon_h1", "Falcon-H1 (parallel attention and Mamba-2)",
         dict(mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1, mamba_d_ssm=128, mamba_d_state=8,
              mamba_chunk_size=16, head_dim=16)),
    Arch("qwen3_next", "Qwen3-Next-80B-A3B-Thinking (hybrid linear attention)",
         dict(head_dim=16, num_hidden_layers=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
              shared_expert_intermediate_size=32, linear_num_value_heads=4, linear_num_key_heads=2,
              linear_key_head_dim=16, linear_value_head_dim=16,
              layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention"])),
]
BY_NAME = {arch.name: arch for arch in ARCHITECTURES}


def make_arch_model(name: str, vocab: int, seed: int = 0) -> torch.nn.Module:
    """A random transformers causal LM of architecture ``name`` with eager attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = BY_NAME[name]
    settings = {**(BASE if arch.base else {}), **arch.settings, "vocab_size": vocab}
    config = AutoConfig.for_model(name, **settings)
    for token in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, token, None) is not None and getattr(config, token) >= vocab:
            setattr(config, token, 0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()
