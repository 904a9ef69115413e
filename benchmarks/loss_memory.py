#!/usr/bin/env python
"""Peak memory and time of the distillation loss alone (forward + backward), three implementations, same inputs.

Every implementation starts from the same final hidden states of a student `(B, T, H)` and a teacher, and the same
output-head weights `(V, H)`, and ends with gradients with respect to the student's hidden states (and, with
`--head trainable`, the student's head weight):

- `ours`: `trl_agent_distill.losses.chunked_span_divergence_loss` (projects only the trained rows, a chunk at a
  time, recomputing each chunk in backward; never builds `(B, T, V)` logits).
- `gkd`: what `trl.experimental.gkd.GKDTrainer.compute_loss` does after its forwards: full logits through the head
  matmul for both models, then `GKDTrainer.generalized_jsd_loss` on the shifted logits and labels.
- `trl_chunked`: `trl.trainer.distillation_trainer._chunked_divergence_loss`, the function `trl.DistillationTrainer`
  calls, around `trl.kernels.chunked_divergence.ChunkedDivergenceFunction` (private API). It is given the full
  hidden states and the completion mask, as the trainer does: it compacts the trained rows only on Triton devices
  (CUDA / XPU) and projects every row elsewhere. `trl_chunked_trained_rows` hands it the trained rows only, the
  CUDA behaviour, for a like-for-like comparison on CPU.

Memory: on CUDA the allocator's peak during the call minus what was allocated before it (the inputs); on CPU each
case runs in a forked child that resets the kernel's peak-RSS counter (`/proc/self/clear_refs`) after building its
inputs, so the peak is the child's VmHWM minus its VmRSS just before the call. Either way the gradients written
into `.grad` count towards the peak (they are the same size for every implementation). Time: median of `--repeats`
forward+backward calls after one warm-up call (CUDA events on CUDA, `perf_counter` on CPU).

Prints one JSON document on stdout (and writes it to `--output`); progress goes to stderr.

    python benchmarks/loss_memory.py --quick                # CPU, small sizes, about a minute on 2 cores
    python benchmarks/loss_memory.py --device cuda          # the full grid: vocab 32k/152k x tokens 2k/8k, H 2048
    python benchmarks/loss_memory.py --vocab 151936 --tokens 2048 --hidden 2048 --head trainable
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

IMPLEMENTATIONS = ("ours", "gkd", "trl_chunked", "trl_chunked_trained_rows")
DEFAULT_IMPLEMENTATIONS = ("ours", "gkd", "trl_chunked")
HEADS = ("trainable", "frozen")
MIB = 2**20

FULL_GRID = dict(vocab=[32000, 151936], tokens=[2048, 8192], hidden=[2048], beta=[0.0], head=list(HEADS))
QUICK_GRID = dict(vocab=[32000, 151936], tokens=[256, 1024], hidden=[256], beta=[0.0], head=list(HEADS))


# ------------------------------------------------------------------------------------------------ the cases
@dataclass(frozen=True)
class Setting:
    """One set of inputs; every implementation runs on exactly these."""

    vocab: int
    tokens: int  # total, batch x per-sequence length
    batch: int
    hidden: int
    beta: float
    head: str  # "trainable": grads for the student head weight too; "frozen": hidden states only (LoRA-like)
    trained_fraction: float
    temperature: float
    device: str
    dtype: str
    seed: int
    chunk_size: int | None  # ours; None is the library default (about 2**26 / vocab rows)
    logit_std: float

    @property
    def seq_len(self) -> int:
        return self.tokens // self.batch

    def key(self) -> dict:
        return dict(
            vocab=self.vocab, tokens=self.tokens, batch=self.batch, seq_len=self.seq_len, hidden=self.hidden,
            beta=self.beta, head=self.head,
        )


def torch_dtype(setting: Setting) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[setting.dtype]


@dataclass
class Inputs:
    student_hidden: torch.Tensor  # (B, T, H), requires grad
    teacher_hidden: torch.Tensor  # (B, T, H)
    student_weight: torch.Tensor  # (V, H), requires grad when the head is trainable
    teacher_weight: torch.Tensor  # (V, H)
    labels: torch.Tensor  # (B, T), -100 where the previous position is not trained (GKD's convention)
    reason_mask: torch.Tensor  # (B, T): position t predicts a REASON token t + 1
    act_mask: torch.Tensor  # (B, T): position t predicts an ACT token t + 1

    @property
    def trained(self) -> torch.Tensor:
        return self.reason_mask | self.act_mask


def make_inputs(setting: Setting) -> Inputs:
    """Deterministic inputs (same seed, same device kind -> same tensors), built in place to avoid memory spikes.

    Teacher = student + noise, in hidden states and head weights, so the two distributions are related (a moderate
    KL, as in distillation) rather than independent. Logits have a standard deviation of about `logit_std`.
    """
    device, dtype = torch.device(setting.device), torch_dtype(setting)
    B, T, H, V = setting.batch, setting.seq_len, setting.hidden, setting.vocab
    generator = torch.Generator(device=device).manual_seed(setting.seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    student_hidden = randn(B, T, H)
    teacher_hidden = randn(B, T, H).mul_(0.5).add_(student_hidden)
    weight_std = setting.logit_std / math.sqrt(H)
    student_weight = randn(V, H).mul_(weight_std)
    teacher_weight = randn(V, H).mul_(0.5 * weight_std).add_(student_weight)

    # Masks on the CPU with their own generator: identical on every device.
    mask_generator = torch.Generator().manual_seed(setting.seed + 1)
    n_trained = max(1, round(setting.trained_fraction * (T - 1)))
    trained = torch.zeros(B, T, dtype=torch.bool)
    for row in range(B):  # the last position predicts nothing
        trained[row, torch.randperm(T - 1, generator=mask_generator)[:n_trained]] = True
    is_reason = torch.rand(B, T, generator=mask_generator) < 0.5
    reason_mask, act_mask = trained & is_reason, trained & ~is_reason
    labels = torch.full((B, T), -100, dtype=torch.long)
    labels[:, 1:][trained[:, :-1]] = torch.randint(0, V, (int(trained.sum()),), generator=mask_generator)
    return Inputs(
        student_hidden=student_hidden.requires_grad_(True),
        teacher_hidden=teacher_hidden,
        student_weight=student_weight.requires_grad_(setting.head == "trainable"),
        teacher_weight=teacher_weight,
        labels=labels.to(device),
        reason_mask=reason_mask.to(device),
        act_mask=act_mask.to(device),
    )


# --------------------------------------------------------------------------------------- the implementations
def _import_ours():
    from trl_agent_distill.heads import LogitHead
    from trl_agent_distill.losses import DenseTeacher, chunked_span_divergence_loss

    def ours(inputs: Inputs, setting: Setting) -> torch.Tensor:
        trained = inputs.trained
        teacher = DenseTeacher(inputs.teacher_hidden[trained], LogitHead(inputs.teacher_weight))
        return chunked_span_divergence_loss(
            inputs.student_hidden,
            LogitHead(inputs.student_weight),
            teacher,
            inputs.reason_mask,
            inputs.act_mask,
            beta=setting.beta,
            temperature=setting.temperature,
            chunk_size=setting.chunk_size,
        ).loss

    return ours


def _import_gkd():
    from trl.experimental.gkd import GKDTrainer

    def gkd(inputs: Inputs, setting: Setting) -> torch.Tensor:
        # GKDTrainer.compute_loss after its two forwards: the models' lm_head matmul (student with grad, teacher
        # without), shift by one, generalized JSD over the full logits masked by the shifted labels.
        student_logits = F.linear(inputs.student_hidden, inputs.student_weight)
        with torch.no_grad():
            teacher_logits = F.linear(inputs.teacher_hidden, inputs.teacher_weight)
        return GKDTrainer.generalized_jsd_loss(
            student_logits=student_logits[:, :-1, :],
            teacher_logits=teacher_logits[:, :-1, :],
            labels=inputs.labels[:, 1:],
            beta=setting.beta,
            temperature=setting.temperature,
        )

    return gkd


def _import_trl_chunked(trained_rows_only: bool):
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    def trl_chunked(inputs: Inputs, setting: Setting) -> torch.Tensor:
        # As DistillationTrainer._compute_loss calls it: hidden states aligned with the completion mask, the heads'
        # weights (no bias), the trainer's beta and temperature, no num_items_in_batch (mean over valid tokens).
        student_hidden, teacher_hidden, mask = inputs.student_hidden, inputs.teacher_hidden, inputs.trained.long()
        if trained_rows_only:
            trained = inputs.trained
            student_hidden, teacher_hidden = student_hidden[trained][None], teacher_hidden[trained][None]
            mask = torch.ones(1, student_hidden.shape[1], dtype=torch.long, device=mask.device)
        loss, _entropy_sum, _n_valid = _chunked_divergence_loss(
            student_hidden,
            teacher_hidden,
            inputs.student_weight,
            inputs.teacher_weight,
            mask,
            setting.beta,
            temperature=setting.temperature,
        )
        return loss

    return trl_chunked


def load_implementations(names) -> tuple[dict, dict]:
    """The loss callables that import, and a note for each one that does not."""
    loaders = {
        "ours": _import_ours,
        "gkd": _import_gkd,
        "trl_chunked": lambda: _import_trl_chunked(False),
        "trl_chunked_trained_rows": lambda: _import_trl_chunked(True),
    }
    found, missing = {}, {}
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found[name] = loaders[name]()
        except Exception as error:  # noqa: BLE001 - an older/newer TRL without the private API: say so, do not fake it
            missing[name] = f"not importable: {type(error).__name__}: {error}"
    return found, missing


# ------------------------------------------------------------------------------------------------ memory
def _read_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's VmHWM (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS, so the baseline RSS is what is live."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _maxrss_kb() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


class CpuPeak:
    """Peak RSS of this (fresh, forked) process above its RSS at `start()`."""

    method = "VmHWM after /proc/self/clear_refs (fresh forked process per case)"

    def start(self) -> None:
        gc.collect()
        _malloc_trim()
        self.reset = _reset_peak_rss()
        self.base_kb = _read_status_kb("VmRSS")
        if not self.reset or self.base_kb is None:  # fall back to ru_maxrss (a lifetime peak) in the fresh child
            self.method = "ru_maxrss (fresh forked process per case)"
            import resource

            self.base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def peak_mb(self) -> float:
        peak_kb = _read_status_kb("VmHWM") if self.reset else None
        if peak_kb is None:
            peak_kb = _maxrss_kb()
        return max(peak_kb - self.base_kb, 0) / 1024


# ------------------------------------------------------------------------------------------------ one case
def _clear_grads(inputs: Inputs) -> None:
    inputs.student_hidden.grad = None
    inputs.student_weight.grad = None


def _grad_summary(inputs: Inputs) -> dict:
    hidden_grad = inputs.student_hidden.grad
    weight_grad = inputs.student_weight.grad
    return dict(
        grad_hidden_norm=float(hidden_grad.float().norm()) if hidden_grad is not None else None,
        grad_weight_norm=float(weight_grad.float().norm()) if weight_grad is not None else None,
    )


def _warm_up_libraries(fn, setting: Setting) -> None:
    """One call at a toy size, so thread pools / BLAS / kernel compilation are not charged to the measured call."""
    toy = dataclasses.replace(setting, vocab=64, tokens=16 * setting.batch, hidden=16, chunk_size=None)
    inputs = make_inputs(toy)
    fn(inputs, toy).backward()
    del inputs


def run_case(name: str, fn, setting: Setting, repeats: int) -> dict:
    """Build the inputs, warm up, measure the peak of one forward+backward, then time `repeats` more."""
    torch.manual_seed(setting.seed)
    is_cuda = setting.device.startswith("cuda")
    _warm_up_libraries(fn, setting)
    inputs = make_inputs(setting)
    if is_cuda:
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = fn(inputs, setting)
        loss.backward()
        end.record()
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / MIB
        first_ms = start.elapsed_time(end)
        method = "torch.cuda.max_memory_allocated() minus memory_allocated() before the call"
    else:
        peak = CpuPeak()
        peak.start()
        began = time.perf_counter()
        loss = fn(inputs, setting)
        loss.backward()
        first_ms = (time.perf_counter() - began) * 1000
        peak_mb = peak.peak_mb()
        method = peak.method
    result = dict(
        implementation=name,
        status="ok",
        peak_memory_mb=round(peak_mb, 3),
        loss=float(loss.detach().float()),
        memory_method=method,
        **_grad_summary(inputs),
    )
    del loss
    _clear_grads(inputs)

    times = []
    for _ in range(repeats):
        if is_cuda:
            start.record()
            fn(inputs, setting).backward()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn(inputs, setting).backward()
            times.append((time.perf_counter() - began) * 1000)
        _clear_grads(inputs)
    result["time_ms"] = round(statistics.median(times) if times else first_ms, 3)
    result["times_ms"] = [round(t, 3) for t in times]
    result["first_call_ms"] = round(first_ms, 3)
    del inputs
    if is_cuda:
        torch.cuda.empty_cache()
    return result


def in_fresh_process(target, *args) -> dict:
    """Run `target(*args)` (returning a JSON-able dict) in a forked child; a crash or a kill becomes an error dict."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        try:
            payload = target(*args)
        except BaseException as error:  # noqa: BLE001 - report everything to the parent
            payload = dict(status="error", note=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        with os.fdopen(write_end, "w") as pipe:
            json.dump(payload, pipe)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    if text:
        return json.loads(text)
    if os.WIFSIGNALED(status):
        signal_number = os.WTERMSIG(status)
        hint = " (SIGKILL: most likely the out-of-memory killer)" if signal_number == 9 else ""
        return dict(status="error", note=f"the case's process died from signal {signal_number}{hint}")
    return dict(status="error", note=f"the case's process exited with status {os.waitstatus_to_exitcode(status)}")


# ------------------------------------------------------------------------------------------------ agreement
def precheck(implementations: dict, setting: Setting) -> dict:
    """Loss values and full gradients of every implementation at a small size, against `ours`."""
    small = dataclasses.replace(
        setting,
        vocab=min(setting.vocab, 1000),
        tokens=min(setting.tokens, 64 * setting.batch),
        hidden=min(setting.hidden, 64),
        chunk_size=16,  # several chunks even at this size
        head="trainable",
    )
    report = dict(setting=small.key() | dict(chunk_size=small.chunk_size, dtype=small.dtype), implementations={})
    reference = None
    for name, fn in implementations.items():
        inputs = make_inputs(small)
        loss = fn(inputs, small)
        loss.backward()
        values = (loss.detach().float(), inputs.student_hidden.grad.float(), inputs.student_weight.grad.float())
        if reference is None:
            reference = values
        report["implementations"][name] = dict(
            loss=float(values[0]),
            loss_abs_diff_vs_ours=float((values[0] - reference[0]).abs()),
            grad_hidden_max_abs_diff_vs_ours=float((values[1] - reference[1]).abs().max()),
            grad_weight_max_abs_diff_vs_ours=float((values[2] - reference[2]).abs().max()),
        )
    return report


# ------------------------------------------------------------------------------------------------ estimates
def estimate_bytes(name: str, setting: Setting, trl_compacts: bool) -> int:
    """A generous estimate of the case's peak (inputs + gradients + the loss's working memory), to skip cases
    that cannot fit. Factors are from measurements of this script on CPU (float32) with some head-room."""
    element = torch.tensor([], dtype=torch_dtype(setting)).element_size()
    B, T, H, V = setting.batch, setting.seq_len, setting.hidden, setting.vocab
    rows = B * T
    trained_rows = max(1, round(setting.trained_fraction * (T - 1))) * B
    inputs = (2 * rows * H + 2 * V * H) * element
    grads = rows * H * 4 + (V * H * 4 * 2 if setting.head == "trainable" else 0)  # fp32 accumulators + cast
    if name == "gkd":
        # logits of both models, shifted copies, log-softmaxes, the KL elements, the masked rows and their grads
        work = 9 * rows * V * max(element, 4 if setting.device == "cpu" else element)
    elif name == "ours":
        chunk = setting.chunk_size or max(1, 2**26 // V)
        work = 12 * min(chunk, trained_rows) * V * 4 + 2 * trained_rows * H * 4
    else:
        projected = trained_rows if (trl_compacts or name == "trl_chunked_trained_rows") else rows
        tile_rows = min(projected, 4096)
        tiles = 2 if setting.device != "cpu" else 8  # without Triton the tiles are folded with torch temporaries
        work = tiles * tile_rows * min(V, 32768) * 4 + 2 * projected * H * 4
    return int(inputs + grads + work)


def available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


# ------------------------------------------------------------------------------------------------ machine info
def machine_info(device: str) -> dict:
    info = dict(
        device=device,
        torch=torch.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
    )
    try:
        info["cpu_name"] = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        info["cpu_name"] = platform.processor() or None
    try:
        info["memory_total_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        info["device_name"] = torch.cuda.get_device_name(index)
        info["device_memory_gb"] = round(torch.cuda.get_device_properties(index).total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = info["cpu_name"]
    for package in ("trl", "transformers", "trl_agent_distill"):
        try:
            info[package] = __import__(package).__version__
        except Exception:  # noqa: BLE001
            info[package] = None
    try:
        from transformers.utils import is_triton_available

        info["triton_available"] = bool(is_triton_available())
    except Exception:  # noqa: BLE001
        info["triton_available"] = None
    return info


def trl_compacts_rows(device: str) -> bool:
    """Whether `_chunked_divergence_loss` projects only the valid rows on this device (Triton) or all of them."""
    try:
        from trl.kernels.chunked_logprob import _use_triton

        return bool(_use_triton(torch.device(device)))
    except Exception:  # noqa: BLE001
        return False


# ------------------------------------------------------------------------------------------------ main
def _ratio(a, b):
    return round(a / b, 4) if a is not None and b not in (None, 0) else None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"small CPU grid: {QUICK_GRID}")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--vocab", type=int, nargs="+", help=f"default {FULL_GRID['vocab']}")
    parser.add_argument("--tokens", type=int, nargs="+", help=f"total tokens per call, default {FULL_GRID['tokens']}")
    parser.add_argument("--batch", type=int, default=1, help="split the tokens into this many sequences")
    parser.add_argument("--hidden", type=int, nargs="+", help=f"default {FULL_GRID['hidden']}")
    parser.add_argument("--beta", type=float, nargs="+", help="0 forward KL (SAD default), 1 reverse KL, else JSD")
    parser.add_argument("--head", choices=HEADS, nargs="+", help="trainable: grads for the student head too")
    parser.add_argument("--trained-fraction", type=float, default=0.6, help="share of positions in REASON/ACT spans")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--chunk-size", type=int, default=None, help="ours: rows per chunk (default: the library's)")
    parser.add_argument("--implementations", nargs="+", choices=IMPLEMENTATIONS, default=list(DEFAULT_IMPLEMENTATIONS))
    parser.add_argument("--repeats", type=int, default=None, help="timed calls after the warm-up (default 5, quick 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for each case (default: torch's, one per core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logit-std", type=float, default=3.0, help="standard deviation of the random logits")
    parser.add_argument("--memory-headroom", type=float, default=0.85,
                        help="skip a case whose estimated peak exceeds this share of the available memory")
    parser.add_argument("--no-skip", action="store_true", help="run cases even when the estimate says they won't fit")
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args(argv)
    grid = QUICK_GRID if args.quick else FULL_GRID
    for field in ("vocab", "tokens", "hidden", "beta", "head"):
        if getattr(args, field) is None:
            setattr(args, field, list(grid[field]))
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.device == "auto":
        args.device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if not 0.0 < args.trained_fraction <= 1.0:
        parser.error("--trained-fraction must be in (0, 1].")
    if any(not 0.0 <= beta <= 1.0 for beta in args.beta):
        parser.error("--beta values must be in [0, 1].")
    if any(tokens % args.batch or tokens // args.batch < 2 for tokens in args.tokens):
        parser.error("every --tokens value must be a multiple of --batch, with at least 2 tokens per sequence.")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    began = time.perf_counter()
    on_cuda = args.device.startswith("cuda")
    implementations, missing = load_implementations(args.implementations)
    if "ours" not in implementations:
        raise SystemExit(f"Cannot import our loss: {missing.get('ours')}")
    compacts = trl_compacts_rows(args.device)

    settings = [
        Setting(
            vocab=vocab, tokens=tokens, batch=args.batch, hidden=hidden, beta=beta, head=head,
            trained_fraction=args.trained_fraction, temperature=args.temperature, device=args.device,
            dtype=args.dtype, seed=args.seed, chunk_size=args.chunk_size, logit_std=args.logit_std,
        )
        for vocab in args.vocab
        for tokens in args.tokens
        for hidden in args.hidden
        for beta in args.beta
        for head in args.head
    ]

    def with_threads(target, *target_args):
        if args.threads:
            torch.set_num_threads(args.threads)
        return target(*target_args)

    def isolated(target, *target_args):
        # CPU: a fresh forked process per case (clean peak-RSS, no heap left over by earlier cases). CUDA: in
        # process, the allocator's statistics are exact, and a forked child could not re-initialise CUDA.
        return with_threads(target, *target_args) if on_cuda else in_fresh_process(with_threads, target, *target_args)

    document = dict(
        benchmark="distillation loss alone: forward + backward from final hidden states and head weights",
        machine=machine_info(args.device),
        settings=dict(
            quick=args.quick, device=args.device, dtype=args.dtype, vocab=args.vocab, tokens=args.tokens,
            batch=args.batch, hidden=args.hidden, beta=args.beta, head=args.head,
            trained_fraction=args.trained_fraction, temperature=args.temperature, repeats=args.repeats,
            seed=args.seed, logit_std=args.logit_std, threads=args.threads or torch.get_num_threads(),
            ours_chunk_size=args.chunk_size or "library default (2**26 // vocab)",
            implementations=args.implementations,
            trl_chunked_projects="trained rows only (Triton device)" if compacts else "every row (no Triton on this device)",
        ),
        notes=dict(missing) if missing else {},
    )

    print(f"[loss_memory] precheck on {args.device} ...", file=sys.stderr)
    document["precheck"] = [
        isolated(precheck, implementations, dataclasses.replace(settings[0], beta=beta)) for beta in args.beta
    ]

    cases = []
    for setting in settings:
        results = {}
        for name, fn in implementations.items():
            chunk = setting.chunk_size or max(1, 2**26 // setting.vocab)
            estimate = estimate_bytes(name, setting, compacts)
            available = available_bytes(setting.device)
            label = f"{name} V={setting.vocab} T={setting.tokens} H={setting.hidden} beta={setting.beta} {setting.head}"
            if estimate > args.memory_headroom * available and not args.no_skip:
                results[name] = dict(
                    implementation=name, status="skipped",
                    note=f"estimated peak {estimate / 2**30:.1f} GiB > {args.memory_headroom:.0%} of "
                    f"{available / 2**30:.1f} GiB available",
                )
                print(f"[loss_memory] skip {label}: {results[name]['note']}", file=sys.stderr)
                continue
            print(f"[loss_memory] {label} ...", file=sys.stderr, end=" ", flush=True)
            result = isolated(run_case, name, fn, setting, args.repeats)
            result.setdefault("implementation", name)
            result["estimated_peak_mb"] = round(estimate / MIB, 1)
            if name == "ours":
                result["chunk_size"] = chunk
            print(f"{result.get('peak_memory_mb')} MB {result.get('time_ms')} ms {result.get('status')}",
                  file=sys.stderr)
            results[name] = result
        ours = results.get("ours", {})
        for result in results.values():
            if result.get("status") == "ok" and ours.get("status") == "ok":
                result["max_abs_diff_vs_ours"] = abs(result["loss"] - ours["loss"])
                for part in ("grad_hidden_norm", "grad_weight_norm"):
                    if result.get(part) is not None and ours.get(part):
                        result[part + "_rel_diff_vs_ours"] = abs(result[part] - ours[part]) / ours[part]
        ratios = {}
        for other in ("gkd", "trl_chunked", "trl_chunked_trained_rows"):
            theirs = results.get(other, {})
            if ours.get("status") == "ok" and theirs.get("status") == "ok":
                ratios[f"memory_ours_over_{other}"] = _ratio(ours["peak_memory_mb"], theirs["peak_memory_mb"])
                ratios[f"time_ours_over_{other}"] = _ratio(ours["time_ms"], theirs["time_ms"])
        cases.append(dict(setting=setting.key(), results=list(results.values()), ratios=ratios))
    document["cases"] = cases
    document["elapsed_s"] = round(time.perf_counter() - began, 1)

    text = json.dumps(document, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text + "\n")
    return document


if __name__ == "__main__":
    main()
