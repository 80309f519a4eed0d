"""Sample text from a trained run: what did the model learn?

    python scripts/generate.py --run_dir runs/default --prompt "ROMEO:" --max_new_tokens 100
    python scripts/generate.py --run_dir runs/default --temperature 0            # greedy
    python scripts/generate.py --run_dir runs/default --checkpoint runs/default/checkpoints/step_00000100

Reads RUN/config.yaml (the resolved config train.py wrote), builds the model on the CPU, loads the newest complete
checkpoint (saved under any layout: one process, DDP, FSDP2, TP) and samples autoregressively from the prompt
(GPT-2 tokens; an empty prompt starts from <|endoftext|>), cropping the context to model.sequence_length. The text
is printed and written to RUN/samples/. A missing run directory or checkpoint is one line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from data.tokenizer import EOT_TOKEN, gpt2_encoding
from trainer.build import describe_model, load_run
from trainer.errors import ConfigError, UserError


@torch.no_grad()
def sample(model: nn.Module, prompt: list[int], max_new_tokens: int, sequence_length: int, vocab_size: int,
           temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> list[int]:
    """`max_new_tokens` token ids drawn after `prompt`, each from the model's next-token distribution over the
    first min(vocab_size, GPT-2's 50257) ids (the padding rows of the embedding are never drawn) at `temperature`
    (0: the most likely token), restricted to the `top_k` most likely when given. The model sees the last
    `sequence_length` tokens."""
    generator = torch.Generator().manual_seed(seed)
    vocab = min(vocab_size, gpt2_encoding().n_vocab)
    tokens = torch.tensor([prompt or [EOT_TOKEN]])
    new = []
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -sequence_length:])[0, -1, :vocab]
        if temperature == 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None and top_k < vocab:
                logits[logits < torch.topk(logits, top_k).values[-1]] = -float("inf")
            token = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))
        new.append(token)
        tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
    return new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", type=Path, required=True, help="a train.py run directory")
    parser.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=200, help="sample among the K most likely tokens; 0 = all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, help="a step_NNNNNNNN directory (default: the newest)")
    args = parser.parse_args(argv)
    try:
        if args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0:
            raise ConfigError("--max_new_tokens must be >= 1, --temperature >= 0 and --top_k >= 0")
        config, model, checkpoint = load_run(args.run_dir, args.checkpoint)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(describe_model(model, config))
    print(f"checkpoint: {checkpoint}")
    encoding = gpt2_encoding()
    prompt = encoding.encode_ordinary(args.prompt)
    new = sample(model, prompt, args.max_new_tokens, config.model.sequence_length, config.model.vocab_size,
                 args.temperature, args.top_k or None, args.seed)
    text = args.prompt + encoding.decode(new)
    print("-" * 80)
    print(text)
    print("-" * 80)
    output = args.run_dir / "samples" / f"{checkpoint.name}_seed{args.seed}.txt"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text + "\n")
    print(f"sample written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
