"""Text front end timings: cold first call (resource loading) and warm per-call time.

    .venv/bin/python bench/bench_text.py [--calls N]

Each language runs in its own fresh Python process, so its cold time is that
language's load alone (jieba + pypinyin + cn2an for zh, CMU dict + inflect for
en, OpenJTalk for ja, langid for auto). The warm time is the median of N calls
on a 200-character text (mix: ~200) after the first call. `split` times split_text() on a
text ten times as long, with the default budget. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SENTENCES = {
    "en": (
        "On the 21st of March, 2024, Dr. Smith told the committee that the new bridge would cost "
        "about $3.5 million, open in two years, and carry twelve thousand cars a day across the river."
    ),
    "zh": (
        "今天上午九点，市政府召开新闻发布会，介绍了城市交通建设的最新进展。新的地铁线路预计明年底开通，"
        "全长三十二公里，设站二十四座，将大大缓解城东地区的交通压力。市民们纷纷表示期待，希望工程能够按时"
        "完成。有关部门还表示，施工期间将尽量减少对周边居民生活的影响，并及时发布交通管制信息。"
        "欢迎大家继续关注后续报道。"
    ),
    "ja": (
        "今日は朝から雨が降っていましたが、午後になって少しずつ晴れてきました。駅前の新しいパン屋さんには"
        "長い行列ができていて、三十分ほど待ってようやくクロワッサンを買うことができました。明日は友達と一緒に"
        "美術館へ行く予定です。天気が良ければ、帰りに公園を散歩したいと思っています。週末はゆっくり休みます。"
    ),
    "mix": (
        "[EN]Welcome to the conference on speech synthesis, everyone.[EN][ZH]今天我们将讨论多语言语音合成的"
        "最新进展，包括零样本语音克隆和跨语言口音控制。[ZH][JA]皆さん、どうぞよろしくお願いいたします。[JA]"
        "[EN]Let us begin with the first talk of the morning session.[EN]"
    ),
    "auto": (
        "The weather service says the storm will reach the coast tonight, bringing heavy rain and strong "
        "winds, so residents should stay indoors, charge their phones, and keep a flashlight close by."
    ),
}

_CHILD = r"""
import json, statistics, sys, time
language, text, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
from vallexd.text import phonemize, split_text
t1 = time.perf_counter()
first = phonemize(text, language)
t2 = time.perf_counter()
warm = []
for _ in range(calls):
    start = time.perf_counter()
    phonemize(text, language)
    warm.append(time.perf_counter() - start)
long_text = text * 10
start = time.perf_counter()
pieces = split_text(long_text, language)
split_s = time.perf_counter() - start
print(json.dumps({"import_s": t1 - t0, "cold_s": t2 - t1, "warm_s": statistics.median(warm),
                  "chars": len(text), "tokens": len(first.ids), "split_s": split_s,
                  "split_chars": len(long_text), "pieces": len(pieces)}))
"""


def sample(language: str, chars: int = 200) -> str:
    """About `chars` characters of the language's text (mix text is used whole: its tags must pair)."""
    text = SENTENCES[language]
    if language == "mix":
        return text
    return (text + " " + text)[:chars]


def measure(language: str, calls: int) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, language, sample(language), str(calls)],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50, help="warm calls per language (median reported)")
    args = parser.parse_args()
    print(f"{'language':8} {'chars':>5} {'tokens':>6} {'cold first call':>16} {'warm median':>12} "
          f"{'split_text (chars → pieces)':>30}")  # fmt: skip
    for language in SENTENCES:
        r = measure(language, args.calls)
        split = f"{r['split_s'] * 1000:.0f} ms ({r['split_chars']} → {r['pieces']})"
        print(f"{language:8} {r['chars']:>5} {r['tokens']:>6} {r['cold_s']:>14.2f} s "
              f"{r['warm_s'] * 1000:>9.2f} ms {split:>30}")  # fmt: skip
    load = os.getloadavg()
    print(f"({os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; "
          f"median of {args.calls} warm calls)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
