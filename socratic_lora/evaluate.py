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
# A bare の asks ("どうしてそう思ったの", "…の？"); with a full stop it states ("…からなの。").
_QUESTION_END = re.compile(r"([？?]|(か|かな|かね|かしら|でしょう|だろう)。*|の)$")
_TRAILING_OFF = ".…~〜"          # a line that trails off ("どう思いますか…", NFKC "...")
_ASIDE = re.compile(r"[(（【][^(（【)）】]*[)）】]$")
_POLITE_END = re.compile(r"(です|ます|でした|ました|ましょう|でしょう|ません|ください|ませんか|ですか|"
                         r"ますか|でしょうか|ましたか|ですね|ますね|ですよ|ますよ|でしたね|ましたね)[かねよ]?$")
_CONTENT_POS = ("名詞", "動詞", "形容詞", "形状詞")
STOP = set("こと もの よう これ それ あれ どれ ここ そこ 何 なに する ある いる なる できる 思う "
           "言う いう みる 見る 考える 的 ため とき 時 方 さん たち 人".split())


def normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text).strip()


def _decoration(c: str) -> bool:
    """Emoji and other symbols, spaces, marks, closing brackets and quotes, markdown marks."""
    cat = unicodedata.category(c)
    return cat[0] in "SZCM" or cat in ("Pe", "Pf") or c in "*_#`\"'"


def _strip_tail(text: str) -> str:
    """The text without what may follow its last sentence: emoji, markdown marks (**),
    closing brackets and quotes, and a bracketed aside such as （ヒント：虹） after it.
    Left there, they would be read as a last sentence of their own."""
    while True:
        text = text.rstrip()
        aside = _ASIDE.search(text)
        if aside and re.search(r"[^\W_]", text[:aside.start()]):
            text = text[:aside.start()]
        elif text and _decoration(text[-1]):
            text = text[:-1]
        else:
            return text


def sentences(text: str) -> list[str]:
    """Sentences, split after 。！？ and at line ends, once what trails the last sentence
    (emoji, **, 」, an aside) is cut off; a piece without a letter or digit is no sentence."""
    return [s.strip() for s in _SENT.findall(_strip_tail(normalize(text)))
            if re.search(r"[^\W_]", s)]


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
    question (ends in ？/? or a question ending such as か, かしら, でしょう, or a bare の:
    "…なの。" states). A rhetorical question followed by its answer ("なぜでしょう？それは…
    からです。") ends in a statement: no. Emoji, markdown, a closing 」 or an aside after the
    question do not count as a sentence (see `sentences`); a trailing … is looked through."""
    s = sentences(reply)
    return bool(s) and bool(_QUESTION_END.search(s[-1].rstrip(_TRAILING_OFF)))


def question_rate(replies) -> float:
    return _mean(asks_question(r) for r in replies)


_KANJI_DIGITS = {c: i for i, c in enumerate("〇一二三四五六七八九")}
_KANJI_UNITS = {"十": 10, "百": 100, "千": 1000}
_KANJI_NUMERAL_CHARS = set(_KANJI_DIGITS) | set(_KANJI_UNITS) | {"万"}


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


def _fold(text: str) -> str:
    """NFKC, without thousands separators: '1,603' -> '1603' (but '2,4' stays two numbers)."""
    return re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", normalize(text))


def _morpheme_spans(text: str) -> list[tuple]:
    """(start, end, pos1, pos2, pos3) of each morpheme of `text`, by character offset."""
    spans, pos = [], 0
    for w in _tagger()(text):
        start = text.find(w.surface, pos)
        if start >= 0:
            pos = start + len(w.surface)
            spans.append((start, pos, w.feature.pos1, w.feature.pos2, w.feature.pos3))
    return spans


def _kanji_numerals(text: str) -> list[str]:
    """Runs of kanji numerals that MeCab tags as numerals (数詞): 千六百三 in 千六百三年, 十 in
    十分で着く, but not the words 十分 (enough), 百聞, 一緒 or 一番."""
    runs, end = [], None
    for start, stop, _, pos2, _ in _morpheme_spans(text):
        word = text[start:stop]
        if pos2 == "数詞" and all(c in _KANJI_NUMERAL_CHARS for c in word):
            if runs and start == end:
                runs[-1] += word
            else:
                runs.append(word)
            end = stop
    return runs


def numbers(text: str) -> set[float]:
    """Every number a text states: 1,603 / 1.5 / 3/2 / 千六百三 (as values). Kanji count
    only as numerals (十分 'enough' and 百聞 are words), and a lone 一-九 not at all; digits
    inside a Latin word (CO2, H2O) do not count."""
    t = _fold(text)
    out = set()
    fraction = r"(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)"
    for a, b in re.findall(fraction, t):
        if float(b):
            out.add(round(float(a) / float(b), 6))
    t = re.sub(fraction, " ", t)          # 3/2 is the value 1.5, not also 3 and 2
    # digits inside a Latin word (CO2, H2O, mp3) are part of a name, not a number stated
    out |= {round(float(x), 6)
            for x in re.findall(r"(?<![A-Za-z])\d+(?:\.\d+)?(?![A-Za-z])", t)}
    for run in _kanji_numerals(t):
        n = kanji_number(run)
        if n is not None and (len(run) > 1 or n >= 10):  # a lone 一 is usually "one (thing)"
            out.add(float(n))
    return out


_SKIP = "\\s、。・,.!?！？「」『』()（）"   # spaces and punctuation a match looks through
_ALNUM = "0-9A-Za-z\u00c0-\u024f"     # digits and Latin letters


def _answer_pattern(answer: str):
    """(regex, short) for finding `answer` in a `_fold`ed reply, or (None, False) when it is
    only punctuation. The regex ignores case, steps over _SKIP except inside a number ('2、4'
    is not 24), and where the answer begins or ends with a digit or Latin letter, it may not
    continue a number or word there ('2000円' is not in '22000円', 'O2' not in 'CO2', '2' not
    in '0.2'). short: 1-2 kana/kanji, to be checked against morphemes (`_whole_words`)."""
    a = _fold(answer)
    keep = [c for i, c in enumerate(a) if not re.match(f"[{_SKIP}]", c)
            or (0 < i < len(a) - 1 and a[i - 1].isdigit() and a[i + 1].isdigit())]
    if not keep:
        return None, False
    parts = []
    for i, c in enumerate(keep):
        if i and not (keep[i - 1] in "0123456789.," and c in "0123456789.,"):
            parts.append(f"[{_SKIP}]*")
        parts.append(re.escape(c))
    alnum = re.compile(f"[{_ALNUM}]")
    if alnum.match(keep[0]):
        parts.insert(0, f"(?<![{_ALNUM}])" + (r"(?<!\d[./⁄])" if keep[0].isdigit() else ""))
    if alnum.match(keep[-1]):
        parts.append(f"(?![{_ALNUM}])" + (r"(?![./⁄]\d)" if keep[-1].isdigit() else ""))
    short = len(keep) <= 2 and not any(alnum.match(c) for c in keep)
    return re.compile("".join(parts), re.IGNORECASE), short


# A suffix after one of these does not attach to a word: 答えはさんです, ずばりさん.
_UNATTACHED = ("助詞", "助動詞", "副詞", "連体詞", "接続詞", "感動詞", "補助記号", "記号", "空白")


def _whole_words(spans, start: int, end: int) -> bool:
    """Whether text[start:end] is whole morphemes that are not the suffix of the word before
    (さん in 田中さん), nor a numeral inside a longer number (二 in 二十) or counting
    something (二 in 二つ, 三 in 三人: a count is a leak only when it is itself an alias)."""
    inside = [s for s in spans if start <= s[0] and s[1] <= end]
    if not inside or inside[0][0] != start or inside[-1][1] != end:
        return False
    before = [s for s in spans if s[1] == start]
    after = [s for s in spans if s[0] == end]
    if before and (inside[0][2] == "接尾辞" and before[-1][2] not in _UNATTACHED
                   or inside[0][3] == "数詞" and before[-1][3] == "数詞"):
        return False
    return not (inside[-1][3] == "数詞" and after and (
        after[0][3] == "数詞" or after[0][2] == "接尾辞" or after[0][4].startswith("助数詞")))


def leaks_answer(reply: str, answer: str, aliases=()) -> bool:
    """Answer leakage: the reply contains the answer or an alias as a whole word, after NFKC,
    case and punctuation folding, or states the answer's number (1603, 千六百三, 1,603 are
    one). Whole word: an answer that begins or ends with a digit or Latin letter does not
    continue a number or word there (2000円 is not in 22000円, O2 not in CO2), and a short one
    of 1-2 kana or kanji is whole morphemes (さん is not in たくさん, 二 not in 二つ)."""
    r = _fold(reply)
    spans = None
    for a in [answer, *aliases]:
        pattern, short = _answer_pattern(a)
        for m in pattern.finditer(r) if pattern else ():
            if not short:
                return True
            spans = _morpheme_spans(r) if spans is None else spans
            if _whole_words(spans, m.start(), m.end()):
                return True
    wanted = numbers(answer)
    return bool(wanted) and len(wanted) == 1 and bool(wanted & numbers(reply))


def guides(reply: str, learner_turn: str) -> bool:
    """Guidance: the reply refers to something the learner said (shares a content word)."""
    return bool(content_words(reply) & content_words(learner_turn))


def polite_share(reply: str) -> float:
    """Register: share of sentences ending in the です・ます form."""
    s = [x.rstrip("。！？!?" + _TRAILING_OFF) for x in sentences(reply)]
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


def _paired(replies, items, caller: str) -> tuple[list, list]:
    """replies and items as lists of one reply per item; refuses what zip would cut short."""
    replies, items = list(replies), list(items)
    if len(replies) != len(items):
        raise ValueError(f"{caller}: {len(replies)} replies for {len(items)} items; give "
                         "exactly one reply per item, in the items' order")
    if not items:
        raise ValueError(f"{caller}: no items and no replies: there is nothing to score "
                         "(check the split, limit and per_subject)")
    return replies, items


def score_replies(replies, items) -> dict:
    """All metrics for one system. `items`: dicts with context (messages), and optionally
    reference (the eval split's tutor turn) or answer/answer_aliases (adversarial), on every
    item or on none. One reply per item, in order."""
    replies, items = _paired(replies, items, "score_replies")
    for key in ("answer", "reference"):
        lacking = [i for i, it in enumerate(items) if key not in it]
        if lacking and len(lacking) < len(items):
            i = lacking[0]
            raise ValueError(f"score_replies: item {i} (id {items[i].get('id', '?')}) has no "
                             f"{key!r} but {len(items) - len(lacking)} other items do; give it "
                             f"to every item or to none (its metrics need all of them)")
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
    """The messages `system` answers. base and tuned: the dialogue as it is (11 eval dialogues
    start with a system message of their own). prompted and fewshot: SOCRATIC_SYSTEM in place
    of any such message, so that every prompt carries the same instruction (plus, for
    fewshot, two retrieved example exchanges)."""
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
             per_subject: int | None = None, quant=None, prompt_format=None) -> dict:
    """Generate with every system on the same prompts and score them; returns the results.
    `per_subject`: keep only the first N prompts of every subject (see `spread_items`);
    `quant`: QuantSettings to load the base with (None: 16-bit); `prompt_format`: how every
    system's prompts are written (None: what the adapter was trained on, else gemma)."""
    import torch

    from .data import load_split
    from .generate import load_chat_model, model_prompt_format, reply_batch

    if "tuned" in systems and adapter is None:
        raise ValueError("the 'tuned' system needs an adapter (--adapter), or leave it out of "
                         "the systems")
    bad = [x for x in systems if x not in SYSTEMS]
    if bad:
        raise ValueError(f"unknown system(s) {bad}: use {', '.join(SYSTEMS)}")
    items = eval_items(split, limit, seed)   # bad split / per_subject fail before loading
    if per_subject is not None:
        items = spread_items(items, per_subject)
    if not items:
        raise ValueError(f"split {split!r} with limit={limit} gives no prompts: use a limit "
                         "of 1 or more, or none")
    torch.manual_seed(seed)
    m, tok = load_chat_model(model, adapter=adapter, quant=quant, prompt_format=prompt_format)
    retriever = Retriever(load_split("train")) if "fewshot" in systems else None
    results = {"split": split, "items": len(items), "preset": preset,
               "max_new_tokens": max_new_tokens, "prompt_format": model_prompt_format(m),
               "seed": seed, "systems": {}, "examples": {}}
    if per_subject is not None:
        results["per_subject"] = per_subject
    for system in systems:
        # Each system samples from the same seed: its replies do not depend on which systems
        # ran before it (greedy decoding draws no random numbers: unchanged).
        torch.manual_seed(seed)
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


def rescore(res: dict) -> dict:
    """`res` (run_eval's results, e.g. a saved eval.json) with every system's metrics computed
    again from its stored replies, by this version's rules: the metrics may change between
    versions, the replies do not. The prompts are found by id in the split (with the run's
    seed, which picks each eval dialogue's tutor turn; 0 for results that do not record it)."""
    seed = res.get("seed", 0)
    items = {it["id"]: it for it in eval_items(res["split"], seed=seed)}
    out = {**res, "systems": {}}
    for system, examples in res["examples"].items():
        its = []
        for e in examples:
            it = items.get(e["id"])
            if it is None or it["context"][-1]["content"] != e["learner"]:
                raise ValueError(f"rescore: {system}'s reply to {e['id']!r} does not belong to a "
                                 f"prompt of the {res['split']!r} split with seed {seed}; these "
                                 "results come from other data or another seed")
            its.append(it)
        out["systems"][system] = score_replies([e["reply"] for e in examples], its)
    return out


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
    """Read the judge's JSON: the first JSON object in the text that has the rubric's labels
    (also when wrapped in prose or a code fence, or next to other braces such as an echo of
    the format {…}); scores must be 1-5."""
    import json
    decoder, data, others = json.JSONDecoder(), None, 0
    for brace in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, brace.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and all(label in obj for label in JUDGE_LABELS):
            data = obj
            break
        others += 1
    if data is None:
        found = f" ({others} JSON value(s) without them)" if others else ""
        raise ValueError(f"judge reply has no JSON object with the labels "
                         f"{', '.join(JUDGE_LABELS)}{found}: {text[:80]!r}; the judge must "
                         "answer in the format judge_prompt asks for")
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
    """Score replies with `judge`, any callable from a prompt string to the judge's text.
    One reply per item, in order; an error names the item it came from."""
    replies, items = _paired(replies, items, "judge_replies")
    out = []
    for i, (it, r) in enumerate(zip(items, replies)):
        where = f"item {i} (id {it.get('id', '?')})"
        try:
            text = judge(judge_prompt(it["context"], r, it.get("answer")))
        except Exception as e:
            if hasattr(e, "add_note"):                   # Python 3.11+
                e.add_note(f"judge_replies: the judge failed on {where}")
            raise
        try:
            out.append(parse_judgement(text))
        except ValueError as e:
            raise ValueError(f"judge_replies: {where}: {e}") from e
    return out


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
