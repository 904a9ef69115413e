"""Time per optimizer step and peak memory of whole training steps, same student, teacher and batch.

Variants: (a) SFT of the student (cross-entropy only, no teacher), (b) our online-teacher step with the chunked loss,
(b2) the same with the logits loss, (c) our cached-teacher step (cache built first, not timed), (d) TRL's
GKDTrainer with lmbda=0 (its ChatML collator trains only the last assistant turn, so it trains fewer tokens: see
`trained_tokens_per_step`). `data_time_s` is the time per optimizer step spent in the data collator, and
`data_fraction` its share of the step. Models are Qwen2 configs with the vocabulary padded to `--vocab` (151,936 like Qwen2.5)
and a tokenizer trained on the toy trajectories; nothing is downloaded. Each variant runs in its own subprocess so
its peak memory is its own: CUDA `max_memory_allocated`, or on CPU the growth of the process's max RSS over a
baseline taken once models and data are loaded. Prints JSON.

`--startup-rows N` also times the trainer's start-up (its constructor, models already built) on N rows of the
released-trajectory shape (the smolagents fixture's conversations, each row made distinct), read from a JSON-lines
file as `load_dataset` would: twice, in two fresh processes sharing one `datasets` cache, and counts the rows
encoded each time (the second run should find the cache and encode none).

    python benchmarks/train_step.py --quick            # CPU, a few minutes on 2 cores
    python benchmarks/train_step.py --device cuda      # 0.5B-like student, 1.5B-like teacher, bf16
    python benchmarks/train_step.py --quick --variants online_chunked --startup-rows 2000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("sft", "online_chunked", "online_logits", "cached", "gkd")
SMOLAGENTS_FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "data" / "smolagents_rows.jsonl"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models for a CPU run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--student-hidden", type=int)
    parser.add_argument("--student-layers", type=int)
    parser.add_argument("--teacher-hidden", type=int)
    parser.add_argument("--teacher-layers", type=int)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--topk", type=int, default=64, help="teacher cache top-k")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--startup-rows", type=int, default=0, help="also time start-up on this many rows (0: no)")
    parser.add_argument("--output", help="also write the JSON here")
    parser.add_argument("--run-variant", help=argparse.SUPPRESS)  # internal: one variant, in a subprocess
    parser.add_argument("--run-startup", help=argparse.SUPPRESS)  # internal: one start-up, on this data folder
    args = parser.parse_args(argv)
    large = args.device == "cuda" and not args.quick
    defaults = dict(student_hidden=896 if large else 64, student_layers=24 if large else 2,
                    teacher_hidden=1536 if large else 128, teacher_layers=28 if large else 4)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def run_variant(args) -> dict:
    """One variant in this process: build everything, take a baseline, train warm-up + timed steps."""
    import torch
    from transformers import TrainerCallback

    from trl_agent_distill import AgentDistillConfig, AgentDistillTrainer
    from trl_agent_distill.collator import AgentTrajectoryCollator
    from trl_agent_distill.encoding import encode_dataset, trained_token_counts
    from trl_agent_distill.teacher_cache import build_teacher_cache, run_fingerprint
    from trl_agent_distill.tiny import build_tiny_model, toy_texts, toy_trajectories, train_tokenizer

    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    tokenizer = train_tokenizer(toy_texts(), vocab_size=1024)
    heads = {"student": (args.student_hidden, args.student_layers), "teacher": (args.teacher_hidden, args.teacher_layers)}

    def model(role, seed):
        hidden, layers = heads[role]
        built = build_tiny_model(tokenizer, "qwen2", hidden, layers, num_heads=max(1, hidden // 64), seed=seed, vocab_size=args.vocab)
        return built.to(device=args.device, dtype=dtype)

    student, teacher = model("student", 0), model("teacher", 1)
    dataset = toy_trajectories()
    scratch = Path(tempfile.mkdtemp())
    common = dict(
        output_dir=str(scratch / "out"), per_device_train_batch_size=args.batch_size, max_steps=args.steps + 1,
        learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none", use_cpu=args.device == "cpu",
        bf16=args.device == "cuda", max_length=args.max_length, disable_tqdm=True, seed=0,
        activation_checkpointing=False, dataloader_num_workers=0,
    )
    extra, cache_info = {}, {}
    if args.run_variant == "sft":
        extra = dict(lambda_reason=0.0, lambda_act=0.0, lambda_ce=1.0)
        teacher = None
    elif args.run_variant == "online_logits":
        extra = dict(loss_implementation="logits")
    elif args.run_variant == "cached":
        config = AgentDistillConfig(**common, teacher_cache=str(scratch / "cache"), teacher_cache_topk=args.topk)
        collator = AgentTrajectoryCollator(tokenizer, max_length=args.max_length)
        started = time.perf_counter()
        encoded, _ = encode_dataset(dataset, collator)
        build_teacher_cache(teacher, collator, encoded, config.teacher_cache, run_fingerprint(config, tokenizer, encoded),
                            batch_size=args.batch_size, show_progress=False)
        cache_bytes = sum(p.stat().st_size for p in (scratch / "cache").rglob("*.arrow"))
        trained = int(trained_token_counts(encoded).sum())
        cache_info = {"cache_build_s": time.perf_counter() - started, "cache_bytes_per_trained_token": cache_bytes / max(trained, 1)}
        extra = dict(teacher_cache=config.teacher_cache, teacher_cache_topk=args.topk)
        teacher = None

    if args.run_variant == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        trainer = GKDTrainer(model=student, teacher_model=teacher, args=GKDConfig(**common, lmbda=0.0, beta=0.0),
                             train_dataset=dataset, processing_class=tokenizer)
    else:
        trainer = AgentDistillTrainer(model=student, teacher_model=teacher, args=AgentDistillConfig(**common, **extra),
                                      train_dataset=dataset, processing_class=tokenizer)

    step_times, trained_tokens, data_times = [], [], []
    original_collator = trainer.data_collator

    def counting_collator(rows):
        started = time.perf_counter()
        batch = original_collator(rows)
        data_times.append(time.perf_counter() - started)
        trained_tokens.append(int((batch["labels"][:, 1:] != -100).sum()))
        return batch

    trainer.data_collator = counting_collator

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            if args.device == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.started)

    trainer.add_callback(StepTimer())
    if args.device == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trainer.train()
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    timed = step_times[1:] or step_times
    # One collator call per optimizer step (no accumulation); the first fetch also warms the dataloader up.
    data_time = statistics.median(data_times[1:] or data_times)
    return {
        "variant": args.run_variant,
        "step_time_s": statistics.median(timed),
        "data_time_s": data_time,
        "data_fraction": data_time / statistics.median(timed),
        "peak_memory_mb": peak / 2**20,
        "trained_tokens_per_step": statistics.mean(trained_tokens[1:] or trained_tokens),
        **cache_info,
    }


def write_released_rows(folder: Path, count: int) -> Path:
    """`count` distinct rows shaped like the released trajectories: the fixture's conversations, numbered."""
    from trl_agent_distill.data import from_smolagents_log

    with SMOLAGENTS_FIXTURE.open() as handle:
        conversations = [from_smolagents_log(json.loads(line))["messages"] for line in handle if line.strip()]
    path = folder / "released.jsonl"
    with path.open("w") as handle:
        for index in range(count):
            messages = [dict(m) for m in conversations[index % len(conversations)]]
            user = next(i for i, m in enumerate(messages) if m["role"] == "user")
            messages[user]["content"] += f" (variant {index})"
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def run_startup(args) -> dict:
    """One start-up in this process: the trainer's constructor on the released-shape rows, models already built."""
    import datasets
    import torch

    from trl_agent_distill import AgentDistillConfig, AgentDistillTrainer
    from trl_agent_distill.collator import AgentTrajectoryCollator
    from trl_agent_distill.tiny import build_tiny_model, toy_texts, train_tokenizer

    folder = Path(args.run_startup)
    torch.manual_seed(0)
    tokenizer = train_tokenizer(toy_texts(), vocab_size=1024)
    student = build_tiny_model(tokenizer, "qwen2", 64, 2, num_heads=1, seed=0)
    teacher = build_tiny_model(tokenizer, "qwen2", 64, 2, num_heads=1, seed=1)
    dataset = datasets.load_dataset("json", data_files=str(folder / "released.jsonl"), split="train",
                                    cache_dir=str(folder / "datasets_cache"))
    encoded_rows = []
    encode = AgentTrajectoryCollator.encode

    def counting_encode(self, row, *a, **k):
        encoded_rows.append(1)
        return encode(self, row, *a, **k)

    config = AgentDistillConfig(output_dir=str(folder / "out"), use_cpu=True, report_to="none", max_steps=1)
    AgentTrajectoryCollator.encode = counting_encode
    try:
        started = time.perf_counter()
        trainer = AgentDistillTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                                      processing_class=tokenizer)
        startup_s = time.perf_counter() - started
    finally:
        AgentTrajectoryCollator.encode = encode
    rows_encoded = len(encoded_rows)
    # Data time of a batch of these rows: what the dataloader does per step, fetching rows and collating them.
    batch_times = []
    rows = len(trainer.train_dataset)
    for first in range(0, 40 * args.batch_size, args.batch_size):
        started = time.perf_counter()
        trainer.data_collator([trainer.train_dataset[i % rows] for i in range(first, first + args.batch_size)])
        batch_times.append(time.perf_counter() - started)
    return {"startup_s": startup_s, "rows": len(dataset), "rows_encoded": rows_encoded,
            "data_time_per_batch_s": statistics.median(batch_times)}


def startup(args, base: list[str]) -> dict:
    """Two start-ups in fresh processes on the same data and `datasets` cache: a first run and a cached one."""
    folder = Path(tempfile.mkdtemp())
    write_released_rows(folder, args.startup_rows)
    runs = []
    for _ in range(2):
        command = [sys.executable, __file__, *base, "--run-startup", str(folder)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0
                    else {"error": done.stderr[-2000:]})
    return {"first_run": runs[0], "second_run": runs[1]}


def ratio(results, numerator, denominator, key):
    top, bottom = results.get(numerator, {}).get(key), results.get(denominator, {}).get(key)
    return top / bottom if top is not None and bottom else None


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.run_variant:
        print(json.dumps(run_variant(args)))
        return {}
    if args.run_startup:
        print(json.dumps(run_startup(args)))
        return {}
    import torch
    import transformers
    import trl

    results = {}
    given = list(argv if argv is not None else sys.argv[1:])
    if "--output" in given:  # the parent writes the report; the variants only print theirs
        at = given.index("--output")
        del given[at : at + 2]
    base = given
    for variant in args.variants:
        command = [sys.executable, __file__, *base, "--run-variant", variant]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
        if done.returncode != 0:
            results[variant] = {"variant": variant, "error": done.stderr[-2000:]}
            continue
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    startup_report = startup(args, base) if args.startup_rows else None
    report = {
        "benchmark": "train_step",
        "machine": {
            "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("output", "run_variant", "run_startup")},
        "memory_note": "CUDA: max_memory_allocated over the loaded models; CPU: growth of max RSS over the loaded models",
        "results": list(results.values()),
        "startup": startup_report,
        "ratios": {
            "online_chunked_vs_gkd_memory": ratio(results, "online_chunked", "gkd", "peak_memory_mb"),
            "online_chunked_vs_gkd_time": ratio(results, "online_chunked", "gkd", "step_time_s"),
            "cached_vs_sft_time": ratio(results, "cached", "sft", "step_time_s"),
            "cached_vs_sft_memory": ratio(results, "cached", "sft", "peak_memory_mb"),
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
