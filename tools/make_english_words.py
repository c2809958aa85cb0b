"""Regenerate edge/data/english_words.txt: the 50,000 most frequent English words (wordfreq 3.1.1,
ASCII letters only).  The safety screen never 'corrects' a word on this list to a medical term, and
uses it to tell a message mostly not in English.  A build-time tool: wordfreq (56 MB) is not a
dependency of the device.

    pip install wordfreq==3.1.1 && python tools/make_english_words.py
"""

from pathlib import Path

from wordfreq import top_n_list

OUT = Path(__file__).resolve().parents[1] / "edge" / "data" / "english_words.txt"
words = sorted({w for w in top_n_list("en", 50000) if w.isascii() and w.isalpha()})
OUT.write_text("# wordfreq 3.1.1, top_n_list('en', 50000), ASCII letters only (tools/make_english_words.py)\n"
               + "\n".join(words) + "\n", encoding="utf-8")
print(f"{OUT}: {len(words)} words")
