"""How far the loss from a top-k teacher cache is from the loss with the live teacher, per k.

Uses the toy pair (a teacher fine-tuned on the embedded toy trajectories and an untrained student, or `--teacher` /
`--student` paths to real models), builds a cache for each k, and compares, over the whole dataset, the span losses
of the student with the cached teacher against the live teacher on the same batches. Also reports the bytes per
trained token of each cache. Prints JSON.

    python benchmarks/cache_fidelity.py --topk 1 4 16 64
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topk", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--teacher", help="teacher path (default: the toy teacher, fine-tuned here)")
    parser.add_argument("--student", help="student path (default: the toy student)")
    parser.add_argument("--teacher-sft-steps", type=int, default=80)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--output", help="also write the JSON here")
    return parser.parse_args(argv)


def span_losses(trainer, batch_size) -> dict:
    """Token-weighted REASON / ACT divergences and the total loss of the student over its training rows."""
    import torch

    dataset = trainer.train_dataset  # with the cache's columns when it reads a cache
    trainer.model.eval()
    sums = dict(reason=0.0, act=0.0, reason_tokens=0, act_tokens=0, loss=0.0, batches=0)
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = trainer.data_collator([dataset[i] for i in range(start, min(len(dataset), start + batch_size))])
            trainer._span_stats["eval"].zero_()
            sums["loss"] += trainer.compute_loss(trainer.model, batch).item()
            reason_sum, reason_tokens, act_sum, act_tokens, _ = trainer._span_stats["eval"].tolist()
            sums["reason"] += reason_sum
            sums["act"] += act_sum
            sums["reason_tokens"] += reason_tokens
            sums["act_tokens"] += act_tokens
            sums["batches"] += 1
    return {
        "loss_reason": sums["reason"] / max(sums["reason_tokens"], 1),
        "loss_act": sums["act"] / max(sums["act_tokens"], 1),
        "loss": sums["loss"] / max(sums["batches"], 1),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_agent_distill import AgentDistillConfig, AgentDistillTrainer
    from trl_agent_distill.collator import AgentTrajectoryCollator
    from trl_agent_distill.encoding import encode_dataset, trained_token_counts
    from trl_agent_distill.teacher_cache import build_teacher_cache, run_fingerprint
    from trl_agent_distill.tiny import prepare_toy_pair, toy_trajectories

    scratch = Path(tempfile.mkdtemp())
    teacher_path, student_path = args.teacher, args.student
    if teacher_path is None or student_path is None:
        teacher_path, student_path = prepare_toy_pair(scratch / "toy", args.teacher_sft_steps)
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    dataset = toy_trajectories()
    base = dict(per_device_train_batch_size=args.batch_size, max_length=args.max_length, report_to="none",
                use_cpu=not torch.cuda.is_available(), save_strategy="no", disable_tqdm=True)

    def trainer(**extra):
        config = AgentDistillConfig(output_dir=str(scratch / "out"), **base, **extra)
        student = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32)
        live_teacher = teacher if "teacher_cache" not in extra else None
        return AgentDistillTrainer(model=student, teacher_model=live_teacher, args=config, train_dataset=dataset,
                                   processing_class=tokenizer)

    live = span_losses(trainer(), args.batch_size)
    collator = AgentTrajectoryCollator(tokenizer, max_length=args.max_length)
    encoded, _ = encode_dataset(dataset, collator)
    trained_tokens = int(trained_token_counts(encoded).sum())
    per_k = []
    for k in args.topk:
        cache = scratch / f"cache-k{k}"
        config = AgentDistillConfig(output_dir=str(scratch / "out"), **base, teacher_cache=str(cache), teacher_cache_topk=k)
        build_teacher_cache(teacher, collator, encoded, cache, run_fingerprint(config, tokenizer, encoded),
                            batch_size=args.batch_size, show_progress=False)
        cached = span_losses(trainer(teacher_cache=str(cache), teacher_cache_topk=k), args.batch_size)
        per_k.append({
            "topk": k,
            "bytes_per_trained_token": sum(p.stat().st_size for p in cache.rglob("*.arrow")) / trained_tokens,
            **{f"cached_{name}": value for name, value in cached.items()},
            **{f"relative_difference_{name}": abs(cached[name] - live[name]) / max(abs(live[name]), 1e-12) for name in live},
        })
    report = {
        "benchmark": "cache_fidelity",
        "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__},
        "teacher": str(teacher_path), "student": str(student_path), "vocab": teacher.config.vocab_size,
        "trained_tokens": trained_tokens, "live_teacher": live, "caches": per_k,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
