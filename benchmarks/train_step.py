"""Time per optimizer step and peak memory of whole training steps, same student, teacher and batch.

Variants: (a) SFT of the student (cross-entropy only, no teacher), (b) our online-teacher step with the chunked loss,
(b2) the same with the logits loss, (c) our cached-teacher step (cache built first, not timed), (d) TRL's
GKDTrainer with lmbda=0 (its ChatML collator trains only the last assistant turn, so it trains fewer tokens: see
`trained_tokens_per_step`). Models are Qwen2 configs with the vocabulary padded to `--vocab` (151,936 like Qwen2.5)
and a tokenizer trained on the toy trajectories; nothing is downloaded. Each variant runs in its own subprocess so
its peak memory is its own: CUDA `max_memory_allocated`, or on CPU the growth of the process's max RSS over a
baseline taken once models and data are loaded. Prints JSON.

    python benchmarks/train_step.py --quick            # CPU, a few minutes on 2 cores
    python benchmarks/train_step.py --device cuda      # 0.5B-like student, 1.5B-like teacher, bf16
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
    parser.add_argument("--output", help="also write the JSON here")
    parser.add_argument("--run-variant", help=argparse.SUPPRESS)  # internal: one variant, in a subprocess
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
        build_teacher_cache(teacher, collator, dataset, config.teacher_cache, run_fingerprint(config, tokenizer, dataset),
                            batch_size=args.batch_size, show_progress=False)
        cache_bytes = sum(p.stat().st_size for p in (scratch / "cache").rglob("*.arrow"))
        trained = sum(sum(1 for k in collator.encode(row).kinds[1:] if k) for row in dataset)
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

    step_times, trained_tokens = [], []
    original_collator = trainer.data_collator

    def counting_collator(rows):
        batch = original_collator(rows)
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
    return {
        "variant": args.run_variant,
        "step_time_s": statistics.median(timed),
        "peak_memory_mb": peak / 2**20,
        "trained_tokens_per_step": statistics.mean(trained_tokens[1:] or trained_tokens),
        **cache_info,
    }


def ratio(results, numerator, denominator, key):
    top, bottom = results.get(numerator, {}).get(key), results.get(denominator, {}).get(key)
    return top / bottom if top is not None and bottom else None


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.run_variant:
        print(json.dumps(run_variant(args)))
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
    report = {
        "benchmark": "train_step",
        "machine": {
            "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("output", "run_variant")},
        "memory_note": "CUDA: max_memory_allocated over the loaded models; CPU: growth of max RSS over the loaded models",
        "results": list(results.values()),
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
