"""Benchmark prompts: unique, reproducible, and about the asked number of tokens long.

Prompts are random words drawn from a fixed list of common English words (most are one token in
any BPE vocabulary) with a seeded generator, so two runs with the same seed send the same text.
Each prompt starts with its own words, so a prefix cache cannot help, unless a shared prefix of
``shared_prefix_len`` tokens is asked for: then every prompt begins with the same words.

The client has no tokenizer; :meth:`PromptSet.calibrate` rescales the word counts from the
number of prompt tokens the server reports for one sample prompt.
"""

from __future__ import annotations

import random

from pagedserve.common_words import WORDS

DEFAULT_TOKENS_PER_WORD = 1.0


class PromptSet:
    """``count`` prompts of about ``input_len`` tokens, the first ``shared_prefix_len`` of them
    common to all; deterministic for a given seed.

    The length model is ``tokens = overhead_tokens + tokens_per_word * words``: the overhead is
    what the server adds around the text (a BOS token, a chat template).
    """

    def __init__(self, count: int, input_len: int, *, seed: int = 0, shared_prefix_len: int = 0):
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        if input_len < 1:
            raise ValueError(f"input_len must be >= 1, got {input_len}")
        if not 0 <= shared_prefix_len < input_len:
            raise ValueError(
                f"shared_prefix_len must be in [0, input_len), got {shared_prefix_len}"
            )
        self.count = count
        self.input_len = input_len
        self.seed = seed
        self.shared_prefix_len = shared_prefix_len
        self.tokens_per_word = DEFAULT_TOKENS_PER_WORD
        self.overhead_tokens = 0.0

    def num_words(self, num_tokens: int) -> int:
        return max(1, round((num_tokens - self.overhead_tokens) / self.tokens_per_word))

    def prompts(self) -> list[str]:
        rng = random.Random(self.seed)
        prefix_words = (
            max(1, round(self.shared_prefix_len / self.tokens_per_word))
            if self.shared_prefix_len else 0
        )
        prefix = [rng.choice(WORDS) for _ in range(prefix_words)]
        unique_words = max(1, self.num_words(self.input_len) - prefix_words)
        return [
            " ".join(prefix + [rng.choice(WORDS) for _ in range(unique_words)])
            for _ in range(self.count)
        ]

    def sample(self, num_words: int) -> str:
        """Text of the same make, not among :meth:`prompts`, for warm-up and calibration."""
        rng = random.Random(f"sample-{self.seed}-{num_words}")
        return " ".join(rng.choice(WORDS) for _ in range(num_words))

    def calibrate(self, short: tuple[int, int], long: tuple[int, int]) -> None:
        """Fit the length model to two (words, prompt tokens the server counted) points.

        A degenerate pair (same word counts, or a server that reports no tokens) leaves the
        model as it was.
        """
        (w1, t1), (w2, t2) = short, long
        if w1 == w2 or t1 <= 0 or t2 <= 0 or t2 <= t1:
            return
        self.tokens_per_word = (t2 - t1) / (w2 - w1)
        self.overhead_tokens = max(0.0, t1 - self.tokens_per_word * w1)
