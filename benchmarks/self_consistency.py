"""Wall time per episode of self-consistent action generation (N candidates per step) against greedy decoding.

The agent is the toy CodeAct teacher (`trl_agent_distill.tiny.prepare_toy_pair`, fine-tuned on the embedded toy
trajectories, or `--model DIR`), answering the toy questions with a `web_search` over the gazetteer entries seen in
those trajectories. Greedy and self-consistency run the same episodes in one batch; self-consistency samples N
candidates per step in the same batched generate call and runs the parseable ones in parallel sandbox forks.
Prints JSON, including how many candidates were valid (so the forks really ran).

    python benchmarks/self_consistency.py                 # CPU, a few minutes on 2 cores (trains the toy teacher)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a CodeAct model directory (default: train the toy teacher)")
    parser.add_argument("--teacher-sft-steps", type=int, default=200)
    parser.add_argument("--n", type=int, default=8, help="self-consistency candidates per step")
    parser.add_argument("--episodes", type=int, default=14)
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per setting (the median is reported)")
    return parser.parse_args(argv)


def gazetteer() -> dict[str, str]:
    """Entry lines printed by `web_search` in the toy trajectories, by the name they start with."""
    from trl_agent_distill.tiny import toy_trajectories

    entries = {}
    for row in toy_trajectories():
        for message in row["messages"]:
            if message["role"] == "user" and message["content"].startswith("Observation:"):
                for line in message["content"].splitlines():
                    match = re.match(r"([A-Z][\w ]+?): ", line)
                    if match and line not in ("Execution logs:",):
                        entries[match.group(1).lower()] = line
    return entries


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_agent_distill.agent import CodeActAgent, SamplingParams, Task, TransformersBackend
    from trl_agent_distill.tiny import prepare_toy_pair, toy_trajectories

    model_dir = args.model
    if model_dir is None:
        model_dir, _ = prepare_toy_pair(tempfile.mkdtemp(prefix="sc-bench-"), args.teacher_sft_steps)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    backend = TransformersBackend(model, tokenizer, batch_size=args.episodes * args.n)
    entries = gazetteer()

    def web_search(query: str) -> str:
        return entries.get(str(query).strip().lower(), f"No entry for {query}.")

    rows = toy_trajectories().select(range(min(args.episodes, 14)))
    system_prompt = rows[0]["messages"][0]["content"]
    tasks = [Task(row["task_id"], row["messages"][1]["content"].removeprefix("New task:\n"), row["answer"])
             for row in rows]
    sampling = SamplingParams(max_new_tokens=args.new_tokens)
    settings = {
        "greedy": None,
        f"self_consistency_{args.n}": {"n": args.n, "temperature": 0.4, "top_p": 0.8},
    }
    results = []
    for name, self_consistency in settings.items():
        agent = CodeActAgent({"web_search": web_search}, max_steps=args.max_steps, sampling=sampling,
                             system_prompt=system_prompt, self_consistency=self_consistency)
        list(agent.run(backend, tasks[:1], batch_size=len(tasks)))  # warm-up
        timings, episodes = [], []
        for repeat in range(args.repeats):
            torch.manual_seed(repeat)
            started = time.perf_counter()
            episodes = list(agent.run(backend, tasks, batch_size=len(tasks)))
            timings.append(time.perf_counter() - started)
        seconds = statistics.median(timings)
        votes = [vote for episode in episodes for vote in episode.votes]
        results.append({
            "setting": name,
            "episodes": len(episodes),
            "steps": sum(e.steps for e in episodes),
            "seconds": round(seconds, 3),
            "seconds_per_episode": round(seconds / len(episodes), 4),
            "seconds_per_step": round(seconds / max(1, sum(e.steps for e in episodes)), 4),
            "answered": sum(e.answered for e in episodes),
            "valid_candidates_per_step": round(statistics.mean(v["valid"] for v in votes), 2) if votes else None,
        })
    greedy = results[0]
    for result in results:
        result["time_per_episode_vs_greedy"] = round(result["seconds_per_episode"] / greedy["seconds_per_episode"], 2)
        result["time_per_step_vs_greedy"] = round(result["seconds_per_step"] / greedy["seconds_per_step"], 2)
    report = {
        "benchmark": "self_consistency",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
        "settings": {"model": model_dir, "parameters": sum(p.numel() for p in model.parameters()), "n": args.n,
                     "episodes": len(tasks), "max_steps": args.max_steps, "new_tokens": args.new_tokens},
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
