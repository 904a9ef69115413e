"""Episodes per second of the CodeAct loop with a local transformers model, one episode at a time vs batched.

The model is a small Qwen2 built from a config with a tokenizer trained on the toy trajectories (nothing is
downloaded). Its weights are random, so every step generates exactly `--new-tokens` tokens and fails to parse:
each episode costs the same `--steps` full-length generations plus a sandbox per episode, whatever the batch
size, which makes the comparison fair. Prints JSON.

    python benchmarks/generation.py                      # CPU, about 2 minutes on 2 cores
    python benchmarks/generation.py --device cuda --hidden 896 --layers 24
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="agent steps per episode")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per step (a thought plus code)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from trl_agent_distill.agent import CodeActAgent, SamplingParams, Task, TransformersBackend
    from trl_agent_distill.tiny import build_tiny_model, toy_texts, train_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = train_tokenizer(toy_texts(), vocab_size=1024)
    model = build_tiny_model(tokenizer, family="qwen2", hidden_size=args.hidden, num_layers=args.layers,
                             num_heads=max(1, args.hidden // 64)).to(args.device)
    agent = CodeActAgent({"web_search": lambda query: f"No entry for {query}."}, max_steps=args.steps,
                         sampling=SamplingParams(max_new_tokens=args.new_tokens))
    tasks = [Task(str(i), f"What is the population of town number {i}?") for i in range(args.episodes)]
    results = []
    for batch_size in args.batch_sizes:
        backend = TransformersBackend(model, tokenizer, batch_size=batch_size)
        list(agent.run(backend, tasks[: min(2, batch_size)], batch_size=batch_size))  # warm-up
        started = time.perf_counter()
        episodes = list(agent.run(backend, tasks, batch_size=batch_size))
        seconds = time.perf_counter() - started
        results.append({
            "batch_size": batch_size,
            "episodes": len(episodes),
            "steps": sum(episode.steps for episode in episodes),
            "seconds": round(seconds, 3),
            "episodes_per_second": round(len(episodes) / seconds, 3),
        })
    base = results[0]["episodes_per_second"]
    for result in results:
        result["speedup_vs_first"] = round(result["episodes_per_second"] / base, 2)
    report = {
        "benchmark": "generation",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "device": args.device,
                    "cuda": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
        "settings": {"episodes": args.episodes, "steps": args.steps, "new_tokens": args.new_tokens,
                     "hidden": args.hidden, "layers": args.layers,
                     "parameters": sum(p.numel() for p in model.parameters())},
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
