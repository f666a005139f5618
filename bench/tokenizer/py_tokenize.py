"""Reference side of the tokenizer benchmark: reads every caption under DIR and
tokenizes it (first line, no BOS/EOS) with transformers' CLIPTokenizer (tokenizers
backend; one call per caption and one batched call) and with open_clip's pure-Python
SimpleTokenizer. Prints seconds per variant and the token counts' checksum.
Usage: $REFPY py_tokenize.py DIR"""
import json
import os
import sys
import tempfile
import time

import open_clip.tokenizer as oct
from transformers import CLIPTokenizer


def captions(root):
    files = sorted(
        os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".txt")
    )
    out = []
    for p in files:
        with open(p, encoding="utf-8-sig") as f:
            out.append(f.read().split("\n")[0].rstrip("\r"))
    return out


def hf_tokenizer(simple, tmp):
    vocab = dict(simple.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer.from_pretrained(tmp)


def timed(name, fn, root):
    t0 = time.perf_counter()
    texts = captions(root)
    counts = fn(texts)
    dt = time.perf_counter() - t0
    print(f"{name:32s} {dt:8.3f} s  {len(texts)} captions, {sum(counts)} tokens, "
          f"{sum(c > 75 for c in counts)} past 75")


def main():
    root = sys.argv[1]
    simple = oct.SimpleTokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_tokenizer(simple, tmp)
    timed("transformers fast, per caption",
          lambda ts: [len(hf(t, add_special_tokens=False)["input_ids"]) for t in ts], root)
    timed("transformers fast, batched",
          lambda ts: [len(x) for x in hf(ts, add_special_tokens=False)["input_ids"]], root)
    fresh = oct.SimpleTokenizer()  # empty word cache, like a fresh process
    timed("open_clip SimpleTokenizer (pure Python)",
          lambda ts: [len(fresh.encode(t)) for t in ts], root)


if __name__ == "__main__":
    main()
