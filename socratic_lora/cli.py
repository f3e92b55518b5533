"""Command line: plan, train, chat, merge, eval and demo (`socratic-lora COMMAND --help`).

    socratic-lora plan --model google/gemma-2-2b-jpn-it --mode balanced --gpu 4GiB --gpu 4GiB
    socratic-lora train --config demo [--resume] [--set key=value ...]
    socratic-lora chat --adapter runs/demo/adapter [--prompt "..."]
    socratic-lora merge --adapter runs/demo/adapter --out runs/demo/merged
    socratic-lora eval --adapter runs/demo/adapter --split eval|adversarial
    socratic-lora demo          # a short tour of the package on the offline default model

Errors print one line with what to do and exit with status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path


def _plan(args) -> None:
    from .placement import KNOWN_CONFIGS, parse_memory, plan_placement

    for i, size in enumerate(args.gpu or []):
        parse_memory(size, f"--gpu #{i + 1} (GPU {i})")
    parse_memory(args.cpu, "--cpu")
    model = args.model
    if model not in KNOWN_CONFIGS or Path(model).is_dir():   # shipped configs need no download
        from .models import get_hf_token, is_local, load_config
        token = None if is_local(model) else get_hf_token()
        model = load_config(model, token=token)
    budgets = dict(enumerate(args.gpu)) if args.gpu else None
    plan = plan_placement(model, args.mode, budgets, args.cpu, bits=args.bits,
                          allow_offload=args.allow_offload)
    print(plan.table())


def _overrides(pairs) -> dict:
    import yaml
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {pair!r}: write key=value, e.g. --set max_steps=10")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"--set {pair!r}: the value is not valid YAML; quote it, e.g. "
                             f"--set '{key.strip()}=\"...\"'") from None
    return out


def _train(args) -> None:
    from .report import markdown
    from .train import load_settings, train

    settings = load_settings(args.config, **_overrides(args.set))
    report = train(settings, resume=args.resume, overwrite=args.overwrite)
    if report:
        print(markdown(report).split("## Data")[0])
        print(f"adapter: {settings.output_dir}/adapter   report: {settings.output_dir}/report.md")


def _chat(args) -> None:
    import torch

    from .generate import load_chat_model, reply

    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty: give the learner's message, or leave --prompt out "
                         "to talk interactively")
    torch.manual_seed(args.seed)
    model, tok = load_chat_model(args.model, adapter=args.adapter,
                                 prompt_format=args.prompt_format)
    history = [{"role": "system", "content": args.system}] if args.system else []
    prompts = [args.prompt] if args.prompt is not None else None
    while True:
        if prompts is not None:
            if not prompts:
                return
            text = prompts.pop()
            print(f"you> {text}")
        else:
            try:
                text = input("you> ").strip()
            except EOFError:
                return
            if text in ("", "exit", "quit"):
                return
        history.append({"role": "user", "content": text})
        print("tutor> ", end="", flush=True)
        try:
            answer = reply(model, tok, history, preset=args.preset, stream=True)
        except ValueError as e:
            if prompts is not None:         # --prompt: the one message cannot be answered
                raise
            history.pop()                   # interactive: say why, and let the learner retry
            print(f"\n(not sent: {e})")
            continue
        history.append({"role": "assistant", "content": answer})


def _merge(args) -> None:
    from .export import merge_adapter, merge_base, push_to_hub, write_card

    out = merge_adapter(args.adapter, args.out, model=args.model, overwrite=args.overwrite)
    print(f"merged model written to {out}")
    if args.push_to_hub:
        files = write_card(out, merge_base(args.adapter, args.model))
        print(f"model card written: {', '.join(f.name for f in files)} (edit before making "
              "the repository public)")
        push_to_hub(out, args.push_to_hub)
        print(f"pushed to {args.push_to_hub}")


def _write_eval_atomically(write_eval, res, out: Path) -> None:
    """write_eval into a temporary folder beside `out`, then rename: a kill while writing
    leaves no half eval.json in `out` (each file is replaced whole)."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_eval(res, tmp)
        if not out.exists():
            os.replace(tmp, out)
            return
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


DEFAULT_SYSTEMS = "base,prompted,fewshot,tuned"


def _eval(args) -> None:
    from .evaluate import eval_markdown, run_eval, write_eval

    from .evaluate import SYSTEMS

    systems = [x.strip() for x in args.systems.split(",") if x.strip()]
    unknown = [x for x in systems if x not in SYSTEMS]
    if unknown or len(set(systems)) != len(systems) or not systems:
        problem = (f"unknown {unknown}" if unknown else "a system named twice"
                   if systems else "no system")
        raise ValueError(f"--systems {args.systems!r}: {problem}; give some of "
                         f"{','.join(SYSTEMS)}, each once")
    if args.adapter is None and "tuned" in systems:
        if args.systems != DEFAULT_SYSTEMS:
            raise ValueError("--systems names 'tuned', which needs --adapter (the tuned model's "
                             "adapter folder); add it, or leave 'tuned' out")
        systems.remove("tuned")        # the default list: no adapter, no tuned row
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder name")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {out} already holds files; pass --overwrite to replace "
                              "eval.json/eval.md/eval.png there, or choose another folder")
    for key in ("limit", "max_new_tokens", "batch_size"):
        value = getattr(args, key)
        if value is not None and value <= 0:
            raise ValueError(f"--{key.replace('_', '-')} {value}: must be a positive number")
    res = run_eval(args.model, args.adapter, args.split, systems, args.limit, args.preset,
                   args.max_new_tokens, args.batch_size, args.seed,
                   prompt_format=args.prompt_format)
    _write_eval_atomically(write_eval, res, out)
    print(eval_markdown(res, examples=1))
    print(f"written: {args.out}/eval.json, eval.md, eval.png")


def _demo(args) -> None:
    import torch

    from .chat import IGNORE, render_chat, tokenize_dialogue
    from .data import load_split
    from .lora import LoraSettings, apply_lora, format_report, trainable_report
    from .models import load_default_model

    torch.manual_seed(0)
    t = time.perf_counter()
    if args.steps <= 0 or not args.lr > 0:
        raise ValueError(f"--steps {args.steps} / --lr {args.lr}: both must be positive "
                         "(e.g. --steps 40 --lr 2e-4)")
    model, tok = load_default_model()
    print(f"loaded the offline default (Gemma 3 270M base) in {time.perf_counter() - t:.1f} s")
    print(model.placement_plan.table(), "\n")
    train = load_split("train")
    dialogue = train[0]["messages"]
    print("one training dialogue in the Gemma turn format:\n" + render_chat(dialogue))
    ex = tokenize_dialogue(tok, dialogue)
    learned = sum(label != IGNORE for label in ex["labels"])
    print(f"{len(ex['input_ids'])} tokens, {learned} of them the tutor's (trained), "
          f"{len(ex['input_ids']) - learned} masked with -100\n")
    question = [{"role": "user", "content": "宿題の答えを教えて。なぜ夜空は暗いの？"}]

    def reply():
        model.config.use_cache = True
        model.eval()
        ids = tok(render_chat(question, add_generation_prompt=True), add_special_tokens=False,
                  return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=40, do_sample=False,
                                 repetition_penalty=1.1)
        model.config.use_cache = False
        return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    print("before LoRA:", reply())
    model = apply_lora(model, LoraSettings(r=16, alpha=32, dropout=0.0, targets="attention",
                                           gradient_checkpointing=False))
    print(format_report(trainable_report(model)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    examples = [tokenize_dialogue(tok, d["messages"], where=d["id"]) for d in train[:args.steps]]
    t = time.perf_counter()
    for step, ex in enumerate(examples, 1):
        batch = {k: torch.tensor([v]) for k, v in ex.items()}
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 1 or step % 10 == 0 or step == len(examples):
            print(f"step {step:3d}  loss {loss.item():.3f}")
    print(f"{len(examples)} steps in {time.perf_counter() - t:.0f} s (one dialogue per step)")
    print("after LoRA: ", reply())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="socratic-lora", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="print where each layer would go, without loading weights")
    p.add_argument("--model", required=True, help="hub id or local folder with config.json")
    p.add_argument("--mode", default="balanced", choices=["balanced", "single", "data_parallel", "cpu"])
    p.add_argument("--gpu", action="append", metavar="SIZE",
                   help="budget of the next GPU, e.g. 4GiB (repeat per GPU; default: free memory)")
    p.add_argument("--cpu", default="24GiB", help="CPU budget (used with --allow-offload)")
    p.add_argument("--bits", type=int, default=4, choices=[4, 8, 16, 32])
    p.add_argument("--allow-offload", action="store_true", help="let layers that do not fit go to the CPU")
    p.set_defaults(func=_plan)
    t = sub.add_parser("train", help="train a LoRA adapter from a YAML config")
    t.add_argument("--config", required=True, help="shipped name (demo, colab_t4, kaggle_2xt4_balanced, "
                   "kaggle_2xt4_ddp, rinna_neox_3.6b_dolly, gemma2_27b_qlora) or a path")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    t.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in output_dir (checkpoints, adapter, report)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    t.set_defaults(func=_train)
    c = sub.add_parser("chat", help="talk to a model (interactive, or one reply with --prompt)")
    c.add_argument("--model", default="default", help="base model id or folder (default: offline)")
    c.add_argument("--adapter", help="a LoRA adapter folder (runs/NAME/adapter)")
    c.add_argument("--prompt", help="one learner message; print the reply and exit")
    c.add_argument("--system", help="an optional system prompt")
    c.add_argument("--prompt-format", choices=["gemma", "instruction"],
                   help="how prompts are written (default: what the adapter was trained on, "
                        "else gemma)")
    c.add_argument("--preset", default="report", choices=["report", "competition", "greedy"],
                   help="decoding: report = the source report's sampling (default), "
                        "competition = greedy with repetition penalty 1.1, greedy = evaluation")
    c.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same reply)")
    c.set_defaults(func=_chat)
    m = sub.add_parser("merge", help="merge an adapter into a 16-bit copy of its base")
    m.add_argument("--adapter", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--model", default="default", help="the base (default: the adapter's record)")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    m.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the merged folder (HF_TOKEN)")
    m.set_defaults(func=_merge)
    e = sub.add_parser("eval", help="score base, prompted, few-shot and tuned systems side by side")
    e.add_argument("--model", default="default")
    e.add_argument("--adapter", help="the tuned system's adapter (without it: no 'tuned' row)")
    e.add_argument("--split", default="eval", choices=["eval", "adversarial"])
    e.add_argument("--systems", default=DEFAULT_SYSTEMS,
                   help="comma-separated, each once (default: all; 'tuned' only with --adapter)")
    e.add_argument("--limit", type=int, help="only the first N dialogues of the split")
    e.add_argument("--preset", default="greedy", choices=["greedy", "competition", "report"])
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--prompt-format", choices=["gemma", "instruction"],
                   help="how every system's prompts are written (default: what the adapter "
                        "was trained on, else gemma)")
    e.add_argument("--out", default="runs/eval")
    e.add_argument("--overwrite", action="store_true", help="replace the files in a non-empty --out")
    e.set_defaults(func=_eval)
    d = sub.add_parser("demo", help="a short tour of the package on the offline default model")
    d.add_argument("--steps", type=int, default=40, help="training steps, one dialogue each")
    d.add_argument("--lr", type=float, default=2e-4)
    d.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        after = (" (checkpoints on disk are complete; continue with --resume)"
                 if args.command == "train" else "")
        print(f"socratic-lora {args.command}: interrupted{after}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  one line, no traceback, never the token
        if os.environ.get("SOCRATIC_LORA_DEBUG"):
            raise
        _close_progress_bars()
        print(f"socratic-lora {args.command}: error: {error_line(e)}", file=sys.stderr)
        return 2
    return 0


def _close_progress_bars() -> None:
    """End a progress bar an error interrupted, so the error starts on its own line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        try:
            bar.close()
        except Exception:  # noqa: BLE001  a bar that cannot close must not hide the error
            pass


# Errors we raise on purpose say what to do; anything else gets its type and a debug hint.
_EXPECTED = (ValueError, OSError, ImportError, KeyError, RuntimeError)


def error_line(e: BaseException, limit: int = 600) -> str:
    """`e` as one line: newlines folded, long library messages cut, the HF token masked."""
    from .models import scrub

    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        text = e.args[0]
    else:
        text = str(e)
    text = " ".join(scrub(text).split()) or type(e).__name__   # mask, then fold the lines
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    if not isinstance(e, _EXPECTED) or type(e).__module__.startswith(("torch", "transformers",
                                                                       "peft", "safetensors")):
        text = f"{text} ({type(e).__name__}; set SOCRATIC_LORA_DEBUG=1 to see the traceback)"
    return text


if __name__ == "__main__":
    sys.exit(main())
