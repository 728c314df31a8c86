"""Tokenisation and text-model throughput: what the service pays per request.

Usage: ``python benchmarks/text/bench_text_encoding.py [--checkpoint DIR] [--posts N] [--batch B]``.
Reads real posts from ``../shared/data/20news-bydate-train.tar.gz`` (relative to the repo root) and
reports posts/s for the spaCy tokenizer alone, for ``TextEncoder.encode`` (tokenise + look up + pad)
and, given a text checkpoint, for encode + forward at batch size 1 and ``--batch``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tarfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from models.checkpoint import load_checkpoint  # noqa: E402
from models.text_encoding import TextEncoder, TextPreprocessing, Vocabulary, load_text_encoder, tokenize  # noqa: E402

ARCHIVE = ROOT.parent / "shared" / "data" / "20news-bydate-train.tar.gz"
logger = logging.getLogger("bench_text_encoding")


def read_posts(count: int, seed: int = 0) -> list[str]:
    posts = []
    with tarfile.open(ARCHIVE) as tar:
        for member in tar:
            if member.isfile():
                handle = tar.extractfile(member)
                assert handle is not None
                posts.append(handle.read().decode("latin-1"))
    random.Random(seed).shuffle(posts)
    return posts[:count]


def rate(label: str, posts: list[str], work, repeats: int = 1) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    for _ in range(repeats):
        work(posts)
    seconds = time.perf_counter() - started
    value = repeats * len(posts) / seconds
    logger.info("%-40s %8.0f posts/s  (%.1f ms/post)", label, value, 1000 * seconds / (repeats * len(posts)))
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a text checkpoint (e.g. runs/text-default)")
    parser.add_argument("--posts", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the service's per-worker setting)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    posts = read_posts(args.posts)
    logger.info("%d posts, mean %.0f characters", len(posts), sum(map(len, posts)) / len(posts))
    results: dict[str, float] = {}
    settings = TextPreprocessing()
    tokenize(posts[:20], settings)  # load spaCy outside the timing
    results["spacy_tokenize"] = rate("spaCy tokenizer (default settings)", posts, lambda p: tokenize(p, settings))
    if args.checkpoint is not None:
        loaded = load_checkpoint(args.checkpoint)
        encoder = load_text_encoder(args.checkpoint, loaded.manifest)
    else:
        encoder = TextEncoder(settings, Vocabulary.build(tokenize(posts[:500], settings), min_freq=1))
    results["encode"] = rate("TextEncoder.encode (batch 32)", posts,
                             lambda p: [encoder.encode(p[i:i + 32]) for i in range(0, len(p), 32)])
    if args.checkpoint is not None:
        model = loaded.model

        def classify(batch_size: int):  # type: ignore[no-untyped-def]
            def work(p: list[str]) -> None:
                with torch.inference_mode():
                    for i in range(0, len(p), batch_size):
                        model(token_ids=encoder.encode(p[i:i + batch_size]))
            return work

        subset = posts[: min(len(posts), 500)]
        results["classify_batch_1"] = rate("encode + forward, batch 1", subset, classify(1))
        results[f"classify_batch_{args.batch}"] = rate(f"encode + forward, batch {args.batch}", posts, classify(args.batch))
    print(json.dumps({k: round(v, 1) for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
