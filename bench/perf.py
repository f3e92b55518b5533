"""Training speed and memory: the copied QLoRA recipe against our fast path, same batches.

    python bench/make_gemma2_2b.py /tmp/g2b          # random-weight gemma-2-2b-jpn-it, once
    python bench/perf.py /tmp/g2b --modes "reference;speed;memory" --out bench/results/perf.jsonl
    python bench/perf.py /tmp/g2b --modes "reference;reference:chunked_ce=1;reference:attention=flex"
    python bench/perf.py /tmp/g2b --modes "reference;speed" --dtype float16
    python bench/perf.py /tmp/g2b --check-grads speed          # LoRA gradients vs the reference
    # two GPUs (bench/two_gpu.sh runs all three against each other):
    CUDA_VISIBLE_DEVICES=0 python bench/perf.py /tmp/g2b --modes speed       # one GPU, 8 a step
    accelerate launch --multi_gpu --num_processes 2 bench/perf.py /tmp/g2b --modes speed --batch 16
    python bench/perf.py /tmp/g2b --modes speed --placement balanced          # one copy split over both

Modes:
  reference      the tutorial recipe: Trainer + peft + bitsandbytes (NF4, double quant),
                 LoRA r=16 alpha=32 q/k/v/o dropout 0.1, prepare_model_for_kbit_training with
                 its default gradient checkpointing, eager attention.
  speed, memory  our path: socratic_lora.fast.load_for_training (the `mode:` training key).
  MODE:k=v,...   (modes are separated by ';') the same with FastSettings fields changed (chunked_ce, ce_chunk, attention,
                 lean_kbit, fused_ops, checkpoint, offload, compile, dequant, flex_tuned,
                 fuse_projections, cache_masks, keep_outputs) and/or dropout=... or optim=... (our modes:
                 the Trainer's optimizer name) or mask=1 (our modes: keep the attention mask
                 in the batches, as the reference has it; by default our modes get batches
                 as train.py makes them, prepare.Collator(causal_only=True));
                 `reference:attention=flex` is the recipe with one technique switched on.

Each mode: fresh model, `--warmup` untimed steps (compilation), then `--steps` timed steps on
fixed random token batches (identical for every mode; all tokens labelled unless
--label-frac). Prints a table and appends one JSON line per mode to --out. The timed steps
are one window, the GPU synchronised only at its two ends (as training runs: the host
queues the next step while the GPU works); --sync-steps synchronises at every step instead
(the timing of results before 2026-12-04). Losses are logged at step 1 and the last step
only (reading a loss on the host is a synchronisation). The reference trains with plain
Trainer and its defaults, our modes with socratic_lora's Trainer (train.py).

--data dialogues: the lengths and tutor-label spans of the shipped training dialogues
(bench/data/train_shapes.json, made by bench/dialogue_shapes.py; 162-493 tokens) with random
ids, batched as the pipeline does: `--batch` dialogues a step in length-grouped order, each
batch padded to its longest (multiple of 8); a mode with `packing=N` packs them into rows of
N tokens instead (prepare.pack_examples, PackedCollator; `packing=1`: N = --seq), batch x seq / N
rows a step (the same number of token slots). tokens/s then counts real
tokens only (all timed steps' tokens over their total time), so padding is not counted as work.

Several GPUs: --batch is the global batch. Under `accelerate launch` (or torchrun) each
process holds one whole 4-bit copy on its own GPU and takes --batch / processes rows a step
(data parallel; --batch 16 on two GPUs keeps each GPU's 8 x 512 of the one-GPU run); tokens/s
counts all processes' tokens, timed on rank 0. `--placement balanced` splits one copy's layers
over all visible GPUs in one process (pipeline order: one GPU works at a time). Rows give the
peak memory of every GPU (`peak_gib_per_gpu`) and, for balanced, where the layers went; MFU
divides by the matmul rate of all GPUs used.

MFU = tokens/s x FLOPs per token / measured bf16 (or fp16) matmul rate, where FLOPs per
token = 2 x forward + 6 x LoRA parameters, forward = 2 x (linear weights of the decoder +
output matrix) + 4 x S x heads x head_dim x layers (attention scores and values, full S x S).
Backward is counted as one more forward (activation gradients only: the base is frozen);
recomputation by checkpointing is not counted (it is overhead, not model work).
"""
from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def parse_mode(text):
    base, _, rest = text.partition(":")
    if base not in ("reference", "speed", "memory"):
        raise SystemExit(f"--modes: {text!r}: start with reference, speed or memory")
    changes = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if value in ("1", "true", "True"):
            v = True
        elif value in ("0", "false", "False") and key not in ("checkpoint", "dropout"):
            v = False
        else:
            try:
                v = int(value)
            except ValueError:
                try:
                    v = float(value)
                except ValueError:
                    v = value
        changes[key] = v
    return base, changes


def batches(n, batch, seq, vocab, label_frac, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n * batch):
        ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
        cut = int(seq * (1 - label_frac))
        out.append({"input_ids": ids, "attention_mask": [1] * seq,
                    "labels": [-100] * cut + ids[cut:]})
    return out


def dialogue_examples(path, vocab, batch, seed=0):
    """The shipped dialogues' shapes with random ids, in the order of transformers'
    length-grouped sampler (shuffled, then sorted longest first within 50-batch groups)."""
    import random
    shapes = json.loads(Path(path).read_text())["examples"]
    rnd = random.Random(seed)
    out = []
    for n, spans in shapes:
        ids = [rnd.randrange(3, vocab) for _ in range(n)]
        labels = [-100] * n
        for a, b in spans:
            labels[a:b] = ids[a:b]
        out.append({"input_ids": ids, "attention_mask": [1] * n, "labels": labels})
    rnd.shuffle(out)
    group = 50 * batch
    return [e for i in range(0, len(out), group)
            for e in sorted(out[i:i + group], key=lambda e: -len(e["input_ids"]))]


def flops_per_token(config, seq, n_lora):
    L, H, I = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    nh, nkv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or H // nh
    linear = L * (H * nh * hd + 2 * H * nkv * hd + nh * hd * H + 3 * H * I)
    head = config.vocab_size * H
    forward = 2 * (linear + head) + 4 * seq * nh * hd * L
    return 2 * forward + 6 * n_lora


def matmul_peak(dtype, n=8192, iters=20):
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    del a, b
    return 2 * n ** 3 * iters / (start.elapsed_time(end) / 1e3) / 1e12


def device_name(rank):
    return torch.cuda.get_device_name(rank) if CUDA else "cpu"


def dtype_of(name):
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_reference(a, changes, local_rank):
    """The recipe as tutorials write it (optionally with FastSettings switches on top)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from socratic_lora.fast import FastSettings, apply_fast_path, lean_kbit_preparation

    dt = dtype_of(a.dtype)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dt) if a.bits == 4 else None
    device_map = "balanced" if a.placement == "balanced" else {"": local_rank if CUDA else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=quant, dtype=dt,
                                                 device_map=device_map,
                                                 attn_implementation="eager")
    changes = dict(changes)
    dropout = float(changes.pop("dropout", 0.1))
    fs = FastSettings.preset("reference").replace(**changes)
    if fs.lean_kbit:
        model = lean_kbit_preparation(model)
        if fs.checkpoint == "keep":
            fs = fs.replace(checkpoint="all")
    elif a.bits == 4:
        model = prepare_model_for_kbit_training(model)   # default: gradient checkpointing on
    else:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout,
                                             target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    return apply_fast_path(model, fs)


def load_ours(a, base, changes):
    from socratic_lora.fast import FastSettings, load_for_training
    from socratic_lora.train import TrainSettings

    changes = dict(changes)
    dropout = float(changes.pop("dropout", 0.0))
    s = TrainSettings(model=a.model, bits=a.bits, compute_dtype=a.dtype,
                      placement=a.placement, lora_r=16, lora_alpha=32, lora_dropout=dropout,
                      lora_targets=LORA_TARGETS, mode=base)
    fs = FastSettings.preset(base).replace(**changes)
    model, _ = load_for_training(s, fs)
    return model, s


CUDA = torch.cuda.is_available()


SYNC_ALL = False        # balanced placement: one process drives every visible GPU


def sync():
    if CUDA:
        if SYNC_ALL:
            for i in range(torch.cuda.device_count()):
                torch.cuda.synchronize(i)
        else:
            torch.cuda.synchronize()


def peaks_per_gpu(world, local_rank):
    """Peak allocated GiB of every GPU in use: all visible ones for balanced placement,
    each process's own under data parallelism (gathered to every rank)."""
    if not CUDA:
        return [0.0]
    if SYNC_ALL:
        return [round(torch.cuda.max_memory_allocated(i) / 2 ** 30, 3)
                for i in range(torch.cuda.device_count())]
    own = round(torch.cuda.max_memory_allocated(local_rank) / 2 ** 30, 3)
    if world == 1:
        return [own]
    import torch.distributed as dist
    got = [None] * world
    dist.all_gather_object(got, own)
    return got


def layer_devices(model):
    """{device: number of decoder layers} of a loaded model (a check that none is off the GPUs)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = base.model.layers if hasattr(base, "model") and hasattr(base.model, "layers") else []
    out = {}
    for layer in layers:
        dev = str(next(layer.parameters()).device)
        out[dev] = out.get(dev, 0) + 1
    return out


def mem(fn, rank):
    return getattr(torch.cuda, fn)(rank) / 2 ** 30 if CUDA else 0.0


from transformers import TrainerCallback  # noqa: E402


class Timer(TrainerCallback):
    """Wall time at the end of every step; optionally profiles one step.

    Window timing (the default): the GPU is synchronised only at the end of the last warmup
    step and of the last step, so the timed steps run as in real training, where the host
    queues the next step while the GPU still works on this one; tokens/s = the window's
    tokens / its time. `sync_steps`: synchronised at every step's end (each step's own time,
    but the queue runs dry at every step: the host-side costs are then all on the clock)."""

    def __init__(self, profile_step=None, profile_path=None, sync_steps=False, sync_at=()):
        self.ends, self.profile_step, self.profile_path, self.prof = [], profile_step, profile_path, None
        self.sync_steps, self.sync_at = sync_steps, set(sync_at)

    def on_step_begin(self, args, state, control, **kw):
        if self.profile_step is not None and state.global_step == self.profile_step:
            from torch.profiler import ProfilerActivity, profile
            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.prof.__enter__()

    def on_step_end(self, args, state, control, **kw):
        if self.prof is not None:
            # The tables take seconds to build: before this step's end is taken, so that
            # they never fall into a timed window (the profiled step is a warmup step).
            self.prof.__exit__(None, None, None)
            averages = self.prof.key_averages()
            table = averages.table(sort_by="self_cuda_time_total", row_limit=30) + \
                "\n\nSorted by host (CPU) time:\n" + \
                averages.table(sort_by="cpu_time_total", row_limit=40)
            Path(self.profile_path).write_text(table)
            # The timeline too, for bench/gaps.py (where the GPU waits for the host).
            trace = str(Path(self.profile_path).with_suffix("")) + ".trace.json"
            self.prof.export_chrome_trace(trace)
            with open(trace, "rb") as f, gzip.open(trace + ".gz", "wb") as g:
                shutil.copyfileobj(f, g)
            os.remove(trace)
            print(table[:6000])
            self.prof = None
            sync()
        if self.sync_steps or state.global_step in self.sync_at:
            sync()
        self.ends.append(time.perf_counter())


def run_mode(a, text, data, world, local_rank, peak_tflops):
    from transformers import Trainer, TrainingArguments

    from socratic_lora.prepare import Collator, PackedCollator, pack_examples

    base, changes = parse_mode(text)
    packing = changes.pop("packing", 0)
    optim = changes.pop("optim", None)
    # Our modes get batches as train.py makes them: right-padded, without an attention mask
    # (prepare.Collator causal_only); `mask=1` keeps the mask, as the reference's batches.
    keep_mask = changes.pop("mask", False)
    causal_only = base != "reference" and not keep_mask
    packing = a.seq if packing is True else int(packing)     # packing=1: rows of --seq
    batch = a.batch
    if packing:
        data, packed = pack_examples(data, packing)
        collator = PackedCollator(0, length=packing)
        batch = max(1, a.batch * a.seq // packing)           # the same tokens a step
        print(packed, flush=True)
    else:
        collator = Collator(0, causal_only=causal_only)
    if len(data) < (a.warmup + a.steps) * batch:
        raise SystemExit(f"{text}: {len(data)} rows make fewer than --warmup + --steps = "
                         f"{a.warmup + a.steps} batches of {batch}")
    torch._dynamo.reset()        # no compiled code carried over from the previous mode
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
    t_load = time.perf_counter()
    per_device = batch // world
    common = dict(per_device_train_batch_size=per_device, max_steps=a.warmup + a.steps,
                  learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0,
                  logging_steps=a.warmup + a.steps, logging_first_step=True,
                  save_strategy="no", report_to="none",
                  remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
                  optim="adamw_torch", bf16=a.dtype == "bfloat16", fp16=a.dtype == "float16",
                  output_dir=f"/tmp/perf_{os.getpid()}", ddp_find_unused_parameters=False,
                  use_cpu=not CUDA)
    if base == "reference":
        model = load_reference(a, changes, local_rank)
        args = TrainingArguments(**common)
    else:
        from socratic_lora.train import training_arguments
        model, s = load_ours(a, base, changes)
        s.batch_size, s.max_steps, s.learning_rate = per_device, a.warmup + a.steps, 2e-4
        s.lr_scheduler, s.warmup, s.save_steps = "constant", 0, 10 ** 9
        s.logging_steps = common["logging_steps"]
        s.output_dir, s.eval_data = common["output_dir"], None
        args = training_arguments(s, model, has_eval=False)
        args.disable_tqdm, args.save_strategy = True, "no"
        if optim:                 # e.g. optim=adamw_torch_fused (torch's fused AdamW kernel)
            from transformers.training_args import OptimizerNames
            args.optim = OptimizerNames(optim)
    if hasattr(args, "train_sampling_strategy"):
        args.train_sampling_strategy = "sequential"     # identical batches in every mode
    else:
        args.group_by_length = False
    load_s = time.perf_counter() - t_load
    weights_gib = mem("memory_allocated", local_rank)
    # The profiled step is the last warmup step (compiled by then), outside the timed window.
    profile_step = (a.warmup - 1 if a.warmup >= 2 else a.warmup + 1) \
        if a.profile and text in a.profile.split(";") else None
    timer = Timer(profile_step, os.path.join(a.profile_dir, f"profile_{len(a._done)}"
                                                  f"{'_rank%d' % local_rank if world > 1 else ''}.txt"),
                  sync_steps=a.sync_steps, sync_at=(max(a.warmup, 1), a.warmup + a.steps))
    sizes = []                      # (real tokens, padded slots) of each batch, in order

    def collate(rows):
        out = collator(rows)
        sizes.append((sum(len(r["input_ids"]) for r in rows), out["input_ids"].numel()))
        return out
    if base == "reference":
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate,
                          callbacks=[timer])
    else:                       # our path trains with socratic_lora's Trainer, as train.py does
        from socratic_lora.train import reliable_trainer_class
        cls = reliable_trainer_class()
        cls.settings = s
        trainer = cls(model=model, args=args, train_dataset=data, data_collator=collate,
                      callbacks=[timer])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps = [b - e for e, b in zip(timer.ends[a.warmup - 1:], timer.ends[a.warmup:])] \
        if a.warmup >= 1 else [b - e for e, b in zip(timer.ends, timer.ends[1:])]
    if a.sync_steps:
        step_s = statistics.median(steps)
    else:                       # one window, synchronised at both ends (Timer)
        step_s = (timer.ends[-1] - timer.ends[a.warmup - 1 if a.warmup >= 1 else 0]) / len(steps)
    tokens = a.batch * a.seq
    # The batches of the timed steps, counted in collation order (the loader collates one
    # batch ahead, so the collator's running count at a step's end is one batch too far).
    first = a.warmup if a.warmup >= 1 else 1
    timed = sizes[first:first + len(steps)]
    real, slots = sum(t for t, _ in timed), sum(n for _, n in timed)
    if world > 1:                   # every process's batches (the collator saw its own only)
        import torch.distributed as dist
        both = torch.tensor([real, slots], dtype=torch.float64,
                            device=f"cuda:{local_rank}" if CUDA else "cpu")
        dist.all_reduce(both)
        real, slots = int(both[0].item()), int(both[1].item())
    if a.data == "dialogues":       # padding is no work: real tokens over the timed time
        tokens_per_s = real / sum(steps)
    else:
        tokens_per_s = tokens / step_s
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fpt = flops_per_token(model.config, a.seq, n_lora)
    per_gpu = peaks_per_gpu(world, local_rank)
    gpus = len(per_gpu)
    row = {
        "mode": text, "bits": a.bits, "dtype": a.dtype, "batch": a.batch, "seq": a.seq,
        "world_size": world, "placement": a.placement, "label_frac": a.label_frac,
        "data": a.data, "packing": packing, "rows_per_step": batch,
        "tokens_per_s": round(tokens_per_s), "step_s": round(step_s, 4),
        "real_token_share": round(real / slots, 4),
        # per-step extremes only when every step was synchronised (else: host intervals)
        "step_s_min": round(min(steps), 4) if a.sync_steps else None,
        "step_s_max": round(max(steps), 4) if a.sync_steps else None,
        "timed_steps": len(steps), "timing": "every step" if a.sync_steps else "window",
        "peak_gib": round(mem("max_memory_allocated", local_rank), 3),
        "peak_gib_per_gpu": per_gpu, "gpus": gpus, "layer_devices": layer_devices(model),
        "peak_reserved_gib": round(mem("max_memory_reserved", local_rank), 3),
        "weights_gib": round(weights_gib, 3),
        "first_loss": losses[0] if losses else None, "losses": losses[:5],
        "finite": all(l == l and abs(l) != float("inf") for l in losses),
        "flops_per_token": fpt, "mfu": round(tokens_per_s * fpt / (gpus * peak_tflops * 1e12), 4),
        "matmul_peak_tflops": round(peak_tflops, 1), "load_s": round(load_s, 1),
        "warmup_and_train_wall_s": round(wall, 1),
        "fast": {k: v for k, v in vars(getattr(model, "fast_settings", {})).items()}
        if hasattr(model, "fast_settings") else None,
        "fast_report": {k: (v if k != "checkpointed_layers" else len(v))
                        for k, v in getattr(model, "fast_report", {}).items()},
    }
    del trainer, model
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    # What this mode leaves allocated once its model is gone: should be ~0, but after each
    # memory-mode run ~1 GiB stayed (weights_gib of the next mode, s9r5; cause not found).
    row["left_after_gib"] = round(mem("memory_allocated", local_rank), 3)
    return row


def check_grads(a, text, data, local_rank):
    """LoRA gradients of one batch: the recipe's computation vs `text`'s techniques, on the
    same model and weights (dropout 0; LoRA B set to small random values so A has gradients)."""
    from socratic_lora.fast import FastSettings, apply_fast_path
    from socratic_lora.prepare import Collator

    base, changes = parse_mode(text)
    changes.pop("dropout", None)
    model = load_reference(a, {"dropout": 0.0}, local_rank)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-3)
    model.train()
    batch = {k: v.to(f"cuda:{local_rank}" if CUDA else "cpu")
             for k, v in Collator(0)(data[:a.batch]).items()}
    dt = dtype_of(a.dtype)

    def grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda" if CUDA else "cpu", dtype=dt):
            loss = model(**batch).loss
        loss.backward()
        return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters()
                             if p.requires_grad}

    ref_loss, ref = grads()
    fs = FastSettings.preset(base if base != "reference" else "reference").replace(**changes)
    fs = fs.replace(lean_kbit=False)     # same weights and dtypes: only the computation differs
    apply_fast_path(model, fs)
    loss, got = grads()
    rel = sorted(((got[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref)
    cos = min(torch.nn.functional.cosine_similarity(got[n].flatten(), ref[n].flatten(), 0).item()
              for n in ref)
    row = {"check": text, "dtype": a.dtype, "ref_loss": ref_loss, "loss": loss,
           "loss_diff": abs(loss - ref_loss), "lora_tensors": len(rel),
           "grad_rel_err_max": max(rel), "grad_rel_err_median": statistics.median(rel),
           "grad_cos_min": cos}
    del model
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="folder of the model (bench/make_gemma2_2b.py)")
    p.add_argument("--modes", default="reference;speed;memory", help="';'-separated")
    p.add_argument("--batch", type=int, default=8, help="global batch (split over GPUs)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--bits", type=int, choices=(4, 16), default=4)
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--placement", choices=("single", "balanced", "data_parallel", "cpu"),
                   default="single", help="cpu: a smoke run of the code, not a measurement")
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    p.add_argument("--data", choices=("random", "dialogues"), default="random",
                   help="random full-length rows, or the shipped dialogues' lengths and labels")
    p.add_argument("--shapes", default=str(Path(__file__).parent / "data" / "train_shapes.json"))
    p.add_argument("--label-frac", type=float, default=1.0,
                   help="share of each sequence that carries labels (the tail)")
    p.add_argument("--check-grads", default=None,
                   help="modes (';'-separated) whose LoRA gradients to compare with the recipe")
    p.add_argument("--profile", default=None, help="modes (';'-separated) to profile one step of")
    p.add_argument("--profile-dir", default=os.environ.get("OUT", "/tmp"))
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--mode-timeout", type=int, default=0, help="give up on a mode after N s")
    p.add_argument("--sync-steps", action="store_true",
                   help="synchronise the GPU at every step's end (per-step times; the "
                        "default times the window of all timed steps, synchronised at its ends)")
    a = p.parse_args(argv)
    a._done = []
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world > 1:
        if a.placement not in ("single", "data_parallel"):
            raise SystemExit(f"--placement {a.placement}: under a launcher of {world} processes "
                             "each process holds a whole copy (data_parallel); run balanced "
                             "as one plain process")
        a.placement = "data_parallel"
    global SYNC_ALL
    SYNC_ALL = a.placement == "balanced"
    if CUDA:
        torch.cuda.set_device(local_rank)
    from transformers import AutoConfig
    vocab = AutoConfig.from_pretrained(a.model).vocab_size
    if a.data == "dialogues":
        data = dialogue_examples(a.shapes, vocab, a.batch)
    else:
        data = batches(a.warmup + a.steps, a.batch, a.seq, vocab, a.label_frac)
    peak = matmul_peak(dtype_of(a.dtype)) if CUDA else 1.0   # CPU: a smoke run only
    if local_rank == 0:
        print(f"{device_name(0)}: measured {a.dtype} matmul peak {peak:.0f} TFLOP/s",
              flush=True)
    rows = []
    for text in filter(None, (a.check_grads or "").split(";")):
        try:
            rows.append(check_grads(a, text, data, local_rank))
        except Exception as e:
            import traceback
            traceback.print_exc()
            rows.append({"check": text, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(json.dumps(rows[-1]), flush=True)
        if a.out and local_rank == 0:
            with open(a.out, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    for text in filter(None, (a.modes or "").split(";")):
        try:
            if a.mode_timeout:
                import signal

                def _alarm(*_):
                    raise TimeoutError(f"mode took longer than --mode-timeout {a.mode_timeout} s")
                signal.signal(signal.SIGALRM, _alarm)
                signal.alarm(a.mode_timeout)
            row = run_mode(a, text, data, world, local_rank, peak)
        except torch.OutOfMemoryError as e:  # report and go on with the next mode
            row = {"mode": text, "error": f"out of memory: {str(e)[:200]}"}
        except Exception as e:
            import traceback
            traceback.print_exc()
            row = {"mode": text, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        if a.mode_timeout:
            signal.alarm(0)
        row["device"] = device_name(local_rank)
        row["command"] = " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
        row["launcher_processes"] = world
        row["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        row["versions"] = {"torch": torch.__version__,
                           "transformers": __import__("transformers").__version__,
                           "peft": __import__("peft").__version__}
        a._done.append(row)
        rows.append(row)
        if local_rank == 0:
            print(json.dumps(row), flush=True)
            if a.out:                 # row by row: a run stopped early keeps what it measured
                with open(a.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    if local_rank != 0:
        return rows
    ref = next((r for r in rows if r.get("mode") == "reference" and "error" not in r), None)
    print(f"\n{'mode':44} {'tok/s':>8} {'x ref':>6} {'step s':>7} {'peak GiB':>8} {'x ref':>6} "
          f"{'MFU':>6} {'loss1':>9}")
    for r in rows:
        if "mode" not in r:
            continue
        if "error" in r:
            print(f"{r['mode']:44} {r['error'][:80]}")
            continue
        sx = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref else "-"
        mx = f"{r['peak_gib'] / ref['peak_gib']:.2f}" if ref and ref["peak_gib"] else "-"
        print(f"{r['mode']:44} {r['tokens_per_s']:8d} {sx:>6} {r['step_s']:7.3f} "
              f"{r['peak_gib']:8.2f} {mx:>6} {r['mfu']:6.3f} {r['first_loss']:9.4f}")
    return rows


if __name__ == "__main__":
    main()
