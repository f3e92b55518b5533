"""Same batches, same first-step loss, whatever the placement (issue: kaggle_2xt4 configs).

    python bench/make_gemma2_2b.py /tmp/g2b            # random-weight gemma-2-2b-jpn-it, once
    CUDA_VISIBLE_DEVICES=0 python bench/two_gpu_loss.py /tmp/g2b single
    python bench/two_gpu_loss.py /tmp/g2b single        # two GPUs visible, the model on GPU 0
    python bench/two_gpu_loss.py /tmp/g2b naive_single  # the same without our n_gpu fix
    python bench/two_gpu_loss.py /tmp/g2b balanced
    torchrun --nproc_per_node 2 bench/two_gpu_loss.py /tmp/g2b ddp

Runs our training path (load_for_training + training_arguments + Trainer) from the shipped
kaggle_2xt4_* configs for three steps on fixed random token batches (8 examples x 256 tokens,
the second half of each labelled as the tutor's) and prints one JSON line: first-step loss,
tokens/s, peak memory per GPU, and where the layers went.
"""
import json
import os
import sys
import time

import torch
from transformers import Trainer

from socratic_lora.prepare import Collator
from socratic_lora.train import load_for_training, load_settings, training_arguments

EXAMPLES, SEQ, VOCAB = 8, 256, 256000


def batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(EXAMPLES * 3):
        ids = torch.randint(3, VOCAB, (SEQ,), generator=g).tolist()
        labels = [-100] * (SEQ // 2) + ids[SEQ // 2:]
        out.append({"input_ids": ids, "attention_mask": [1] * SEQ, "labels": labels})
    return out


def main(model_dir, mode):
    config = "kaggle_2xt4_ddp" if mode == "ddp" else "kaggle_2xt4_balanced"
    world = int(os.environ.get("WORLD_SIZE", 1))
    s = load_settings(config, model=model_dir, max_steps=3, logging_steps=1, grad_accum=1,
                      batch_size=EXAMPLES // world, output_dir=f"/tmp/two_gpu_{mode}",
                      save_steps=1000, warmup=0,
                      placement={"single": "single", "naive_single": "single",
                                 "ddp": "data_parallel"}.get(mode, "balanced"))
    model, _ = load_for_training(s)
    args = training_arguments(s, model, has_eval=False)
    if hasattr(args, "train_sampling_strategy"):
        args.train_sampling_strategy = "sequential"
    else:
        args.group_by_length = False
    if mode == "naive_single":          # undo our fix: what the copied recipe gets
        args._n_gpu = torch.cuda.device_count()
    trainer = Trainer(model=model, args=args, train_dataset=batches(), data_collator=Collator(0))
    t = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if trainer.is_world_process_zero():
        base = model.get_base_model()
        print(json.dumps({
            "mode": mode, "config": config, "world_size": world, "first_loss": losses[0],
            "losses": losses, "tokens_per_s": round(3 * EXAMPLES * SEQ / wall),
            "gpus_visible": torch.cuda.device_count(),
            "layer_devices": sorted({str(p.device) for p in base.parameters()}),
            "peak_gib": [round(torch.cuda.max_memory_allocated(i) / 2**30, 2)
                         for i in range(torch.cuda.device_count())]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
