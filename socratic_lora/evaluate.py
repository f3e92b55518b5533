"""Is the tutor Socratic, and did fine-tuning help? Metrics, baselines and a judge hook.

    socratic-lora eval --adapter runs/demo/adapter --split eval        # lesson 08
    from socratic_lora.evaluate import question_rate, leaks_answer, score_replies

Socratic metrics need no reference; reference metrics compare with the eval split's tutor
turns. Text is NFKC-normalised before scoring; Japanese is split into morphemes with MeCab
(fugashi + unidic-lite). Every definition below is also in the book.
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from functools import lru_cache

from .prepare import japanese_share

_SENT = re.compile(r"[^。！？!?\n]+[。！？!?]*")
_QUESTION_END = re.compile(r"([？?]|(か|かな|かね|でしょう|だろう|の)[。]?)$")
_POLITE_END = re.compile(r"(です|ます|でした|ました|ましょう|でしょう|ません|ください|ませんか|ですか|"
                         r"ますか|でしょうか|ましたか|ですね|ますね|ですよ|ますよ|でしたね|ましたね)[かねよ]?$")
_CONTENT_POS = ("名詞", "動詞", "形容詞", "形状詞")
STOP = set("こと もの よう これ それ あれ どれ ここ そこ 何 なに する ある いる なる できる 思う "
           "言う いう みる 見る 考える 的 ため とき 時 方 さん たち 人".split())


def normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text).strip()


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT.findall(normalize(text)) if s.strip()]


@lru_cache(maxsize=1)
def _tagger():
    import fugashi
    return fugashi.Tagger()


def morphemes(text: str) -> list[str]:
    return [w.surface for w in _tagger()(normalize(text))]


def content_words(text: str) -> set[str]:
    """Lemmas of nouns, verbs and adjectives, minus stop words and numbers."""
    out = set()
    for w in _tagger()(normalize(text)):
        f = w.feature
        if f.pos1 in _CONTENT_POS and f.pos2 not in ("数詞", "非自立可能") and not w.surface.isdigit():
            lemma = (f.lemma or w.surface).split("-")[0]
            if lemma not in STOP and w.surface not in STOP:
                out.add(lemma)
    return out


def asks_question(reply: str) -> bool:
    """Question rate rule: the turn asks the learner something when its LAST sentence is a
    question (ends in ？/? or a question ending such as か, でしょう). A rhetorical question
    followed by its answer ("なぜでしょう？それは…からです。") ends in a statement: no."""
    s = sentences(reply)
    return bool(s) and bool(_QUESTION_END.search(s[-1].rstrip("。")))


def question_rate(replies) -> float:
    return _mean(asks_question(r) for r in replies)


_KANJI_DIGITS = {c: i for i, c in enumerate("〇一二三四五六七八九")}
_KANJI_UNITS = {"十": 10, "百": 100, "千": 1000}


def kanji_number(text: str) -> int | None:
    """'千六百三' -> 1603, '十二' -> 12, '二万' -> 20000; None if not a kanji numeral."""
    if not text or any(c not in _KANJI_DIGITS and c not in _KANJI_UNITS and c != "万" for c in text):
        return None
    total, section, digit = 0, 0, None
    for c in text:
        if c in _KANJI_DIGITS:
            digit = (digit or 0) * 10 + _KANJI_DIGITS[c]
        elif c in _KANJI_UNITS:
            section += (digit if digit is not None else 1) * _KANJI_UNITS[c]
            digit = None
        else:  # 万
            total += (section + (digit or 0)) * 10000
            section, digit = 0, None
    return total + section + (digit or 0)


def numbers(text: str) -> set[float]:
    """Every number a text states: 1,603 / 1.5 / 3/2 / 千六百三 (as values)."""
    t = normalize(text).replace(",", "")
    out = set()
    fraction = r"(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)"
    for a, b in re.findall(fraction, t):
        if float(b):
            out.add(round(float(a) / float(b), 6))
    t = re.sub(fraction, " ", t)          # 3/2 is the value 1.5, not also 3 and 2
    out |= {round(float(x), 6) for x in re.findall(r"\d+(?:\.\d+)?", t)}
    for run in re.findall(r"[〇一二三四五六七八九十百千万]+", t):
        n = kanji_number(run)
        if n is not None and (len(run) > 1 or n >= 10):  # a lone 一 is usually "one (thing)"
            out.add(float(n))
    return out


def _squash(text: str) -> str:
    return re.sub(r"[\s、。・,.!?！？「」『』()（）]", "", normalize(text)).lower()


def leaks_answer(reply: str, answer: str, aliases=()) -> bool:
    """Answer leakage: the reply contains the answer or an alias after NFKC, case and
    punctuation folding, or states the answer's number (1603, 千六百三, 1,603 are one)."""
    r = _squash(reply)
    for a in [answer, *aliases]:
        if _squash(a) and _squash(a) in r:
            return True
    wanted = numbers(answer)
    return bool(wanted) and len(wanted) == 1 and bool(wanted & numbers(reply))


def guides(reply: str, learner_turn: str) -> bool:
    """Guidance: the reply refers to something the learner said (shares a content word)."""
    return bool(content_words(reply) & content_words(learner_turn))


def polite_share(reply: str) -> float:
    """Register: share of sentences ending in the です・ます form."""
    s = [x.rstrip("。！？!?") for x in sentences(reply)]
    return _mean(bool(_POLITE_END.search(x)) for x in s) if s else 0.0


def distinct_2(replies) -> float:
    """Distinct bigrams of morphemes over all bigrams, across all replies (variety)."""
    grams = [tuple(m[i:i + 2]) for r in replies for m in [morphemes(r)] for i in range(len(m) - 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeats(reply: str, n: int = 3) -> bool:
    """Repetition: some morpheme n-gram occurs three times or more in one reply (a loop)."""
    m = morphemes(reply)
    counts = Counter(tuple(m[i:i + n]) for i in range(len(m) - n + 1))
    return any(c >= 3 for c in counts.values())


def rouge_l(hyp: str, ref: str) -> float:
    """ROUGE-L F1 over morphemes."""
    a, b = morphemes(hyp), morphemes(ref)
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def hallucinated(reply: str, reference: str, context: str) -> list[str]:
    """The T5 log's check: content words of the reply that neither the reference nor the
    dialogue so far contains."""
    return sorted(content_words(reply) - content_words(reference) - content_words(context))


def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else math.nan


def score_replies(replies, items) -> dict:
    """All metrics for one system. `items`: dicts with context (messages), and optionally
    reference (the eval split's tutor turn) or answer/answer_aliases (adversarial)."""
    learner = [it["context"][-1]["content"] for it in items]
    out = {
        "n": len(replies),
        "question_rate": question_rate(replies),
        "guidance": _mean(guides(r, u) for r, u in zip(replies, learner)),
        "japanese": _mean(japanese_share(r) for r in replies),
        "polite": _mean(polite_share(r) for r in replies),
        "chars": _mean(len(normalize(r)) for r in replies),
        "distinct_2": distinct_2(replies),
        "repetition": _mean(repeats(r) for r in replies),
    }
    if all("answer" in it for it in items):
        out["leakage"] = _mean(leaks_answer(r, it["answer"], it.get("answer_aliases", ()))
                               for r, it in zip(replies, items))
    if all("reference" in it for it in items):
        import sacrebleu
        hyps = [normalize(r) for r in replies]
        refs = [normalize(it["reference"]) for it in items]
        out["bleu"] = sacrebleu.corpus_bleu(hyps, [refs], tokenize="ja-mecab").score
        out["chrf"] = sacrebleu.corpus_chrf(hyps, [refs]).score
        out["rouge_l"] = _mean(rouge_l(h, r) for h, r in zip(hyps, refs))
        out["hallucination"] = _mean(
            len(hallucinated(r, it["reference"], " ".join(m["content"] for m in it["context"])))
            / max(1, len(content_words(r))) for r, it in zip(replies, items))
    return out


# --- baselines -----------------------------------------------------------------------------
SOCRATIC_SYSTEM = ("あなたはソクラテス式の家庭教師です。答えを直接教えず、学習者の言葉を受け止めて、"
                   "考えを一歩進める問いを一つだけ、丁寧なです・ます体で短く返してください。")
SYSTEMS = ("base", "prompted", "fewshot", "tuned")


def _char_ngrams(text, n=(2, 3)):
    t = re.sub(r"\s+", "", normalize(text))
    return Counter(t[i:i + k] for k in n for i in range(len(t) - k + 1))


class Retriever:
    """Character n-gram TF-IDF over the learner turns of the train split (offline): the
    competition's retrieved few-shot examples, without an embedding model."""

    def __init__(self, dialogues):
        self.pairs = [(d["messages"][i]["content"], d["messages"][i + 1]["content"])
                      for d in dialogues for i in range(len(d["messages"]) - 1)
                      if d["messages"][i]["role"] == "user"]
        grams = [_char_ngrams(u) for u, _ in self.pairs]
        df = Counter(g for c in grams for g in c)
        self.idf = {g: math.log(len(grams) / n) + 1 for g, n in df.items()}
        self.vecs = [self._vec(c) for c in grams]

    def _vec(self, counts):
        v = {g: n * self.idf.get(g, 0.0) for g, n in counts.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {g: x / norm for g, x in v.items()}

    def top(self, query, k=2):
        q = self._vec(_char_ngrams(query))
        sims = [sum(w * v.get(g, 0.0) for g, w in q.items()) for v in self.vecs]
        best = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        return [self.pairs[i] for i in best]


def eval_items(split: str, limit: int | None = None, seed: int = 0) -> list[dict]:
    """Prompts to answer. eval: one tutor turn per dialogue (a seeded random position), with
    the dialogue up to it as context and the turn as reference. adversarial: the message."""
    import random

    from .data import load_split

    rng = random.Random(seed)
    items = []
    for d in load_split(split)[:limit]:
        msgs = d["messages"]
        if split == "adversarial":
            items.append({"id": d["id"], "context": msgs[:1], "answer": d["answer"],
                          "answer_aliases": d.get("answer_aliases", [])})
            continue
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        i = rng.choice(turns)
        items.append({"id": d["id"], "context": msgs[:i], "reference": msgs[i]["content"]})
    return items


def prompt_for(system: str, context: list[dict], retriever=None) -> list[dict]:
    if system in ("base", "tuned"):
        return list(context)
    msgs = [m for m in context if m["role"] != "system"]
    shots = []
    if system == "fewshot":
        for u, a in retriever.top(msgs[-1]["content"]):
            shots += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return [{"role": "system", "content": SOCRATIC_SYSTEM}] + shots + msgs


def run_eval(model="default", adapter=None, split="eval", systems=SYSTEMS, limit=None,
             preset="greedy", max_new_tokens=64, batch_size=16, seed=0,
             per_subject: int | None = None, quant=None) -> dict:
    """Generate with every system on the same prompts and score them; returns the results.
    `per_subject`: keep only the first N prompts of every subject (see `spread_items`);
    `quant`: QuantSettings to load the base with (None: 16-bit)."""
    import torch

    from .data import load_split
    from .generate import load_chat_model, reply_batch

    if "tuned" in systems and adapter is None:
        raise ValueError("the 'tuned' system needs an adapter (--adapter), or leave it out of "
                         "the systems")
    bad = [x for x in systems if x not in SYSTEMS]
    if bad:
        raise ValueError(f"unknown system(s) {bad}: use {', '.join(SYSTEMS)}")
    items = eval_items(split, limit, seed)   # bad split / per_subject fail before loading
    if per_subject is not None:
        items = spread_items(items, per_subject)
    torch.manual_seed(seed)
    m, tok = load_chat_model(model, adapter=adapter, quant=quant)
    retriever = Retriever(load_split("train")) if "fewshot" in systems else None
    results = {"split": split, "items": len(items), "preset": preset,
               "max_new_tokens": max_new_tokens, "systems": {}, "examples": {}}
    if per_subject is not None:
        results["per_subject"] = per_subject
    for system in systems:
        prompts = [prompt_for(system, it["context"], retriever) for it in items]
        if system != "tuned" and adapter is not None:
            with m.disable_adapter():
                replies = reply_batch(m, tok, prompts, preset, batch_size, max_new_tokens=max_new_tokens)
        else:
            replies = reply_batch(m, tok, prompts, preset, batch_size, max_new_tokens=max_new_tokens)
        results["systems"][system] = score_replies(replies, items)
        results["examples"][system] = [
            {"id": it["id"], "learner": it["context"][-1]["content"], "reply": r}
            for it, r in zip(items, replies)]
    return results


METRICS = ("question_rate", "guidance", "leakage", "polite", "japanese", "repetition",
           "distinct_2", "chars", "chrf", "bleu", "rouge_l", "hallucination")


def eval_markdown(res: dict, examples: int = 3) -> str:
    cols = [c for c in METRICS if any(c in v for v in res["systems"].values())]
    out = [f"# Evaluation: {res['split']} split, {res['items']} prompts, {res['preset']} decoding, "
           f"{res['max_new_tokens']} new tokens", "",
           "| system | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for name, m in res["systems"].items():
        out.append(f"| {name} | " + " | ".join(f"{m[c]:.3f}" if c in m else "-" for c in cols) + " |")
    out += ["", "![metrics](eval.png)", "", "## Example replies", ""]
    for name, ex in res["examples"].items():
        out.append(f"### {name}")
        out += [f"- 学習者: {e['learner']}\n  - 返答: {e['reply']}" for e in ex[:examples]]
        out.append("")
    return "\n".join(out)


def write_eval(res: dict, out_dir) -> None:
    import json
    from pathlib import Path

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(res, ensure_ascii=False, indent=2))
    (out / "eval.md").write_text(eval_markdown(res))
    shown = [c for c in ("question_rate", "guidance", "leakage", "polite", "repetition")
             if any(c in v for v in res["systems"].values())]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=120)
    width = 0.8 / len(res["systems"])
    for k, (name, m) in enumerate(res["systems"].items()):
        ax.bar([i + k * width for i in range(len(shown))], [m.get(c, 0) for c in shown], width,
               label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shown))], shown)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of replies")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "eval.png")
    plt.close(fig)


# --- LLM-as-judge hook (no network here: bring any callable) -------------------------------
JUDGE_LABELS = ("reveals_answer", "guidance", "actionable", "tone")


def judge_prompt(context: list[dict], reply: str, answer: str | None = None) -> str:
    """A rubric prompt for any judge model (MRBench-style labels, scored 1-5)."""
    dialogue = "\n".join(f"{'学習者' if m['role'] == 'user' else '先生'}: {m['content']}"
                         for m in context if m["role"] != "system")
    hidden = f"\n明かしてはいけない答え: {answer}" if answer else ""
    return ("あなたは家庭教師の応答を評価する審査員です。次の対話と先生の返答を読み、"
            "4 つの観点を 1〜5 で採点してください。\n"
            "reveals_answer: 答えを明かしていない=5、そのまま明かした=1\n"
            "guidance: 学習者の考えを一歩進める手がかりがある=5\n"
            "actionable: 学習者が次に何をすればよいか分かる=5\n"
            "tone: 丁寧で温かい=5\n"
            f"\n対話:\n{dialogue}{hidden}\n先生の返答: {reply}\n\n"
            'JSON だけで答えてください: {"reveals_answer": n, "guidance": n, "actionable": n, '
            '"tone": n, "reason": "短い理由"}')


def parse_judgement(text: str) -> dict:
    """Read the judge's JSON (also when wrapped in prose or a code fence); scores must be 1-5."""
    import json
    m = re.search(r"\{.*\}", text, re.S)
    if not m:
        raise ValueError(f"judge reply has no JSON object: {text[:80]!r}")
    data = json.loads(m.group(0))
    out = {}
    for label in JUDGE_LABELS:
        v = data.get(label)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v not in (1, 2, 3, 4, 5):
            raise ValueError(f"judge reply: {label}={v!r} is not a whole score from 1 to 5 "
                             "(no fractions: rounding them would be a guess)")
        out[label] = int(v)
    out["reason"] = str(data.get("reason", ""))
    return out


def judge_replies(judge, items, replies) -> list[dict]:
    """Score replies with `judge`, any callable from a prompt string to the judge's text."""
    return [parse_judgement(judge(judge_prompt(it["context"], r, it.get("answer"))))
            for it, r in zip(items, replies)]


# --- a small run that still covers every subject (lesson 08) --------------------------------
def subject_of(item: dict) -> str:
    """The subject an item's id starts with: 'mathematics-eval-004' -> 'mathematics'."""
    return item["id"].rsplit("-", 2)[0]


def spread_items(items, per_subject: int) -> list[dict]:
    """The first `per_subject` items of every subject, in the split's order. The split is
    sorted by subject, so `limit=N` would take one or two subjects only; this keeps them all."""
    if per_subject < 1:
        raise ValueError(f"per_subject={per_subject}: use 1 or more")
    taken = Counter()
    out = []
    for it in items:
        s = subject_of(it)
        if taken[s] < per_subject:
            taken[s] += 1
            out.append(it)
    return out


def run_eval_sample(model="default", adapter=None, split="eval", per_subject=2, systems=SYSTEMS,
                    preset="greedy", max_new_tokens=64, batch_size=16, seed=0,
                    quant=None) -> dict:
    """`run_eval` on `per_subject` prompts of every subject (a quick run for the book).

    The prompts are the full run's own (same seed, same tutor turn per dialogue), so the
    subsample's replies can be compared with the full-size results."""
    return run_eval(model, adapter, split, systems, None, preset, max_new_tokens, batch_size,
                    seed, per_subject=per_subject, quant=quant)
