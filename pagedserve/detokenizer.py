"""Token ids -> text, one step at a time, with stop strings.

Two hold-backs make streamed text safe to show at once:

1. UTF-8. A character may span several byte tokens; decoding a prefix of them gives
   '\\ufffd'. We decode a small window of recent tokens (vLLM's prefix/read offsets) and
   release nothing while the window's text ends in '\\ufffd'. An answer that ends there (its
   max_tokens cut an emoji in two) drops the incomplete character rather than show '\\ufffd',
   as vLLM does.

       ids:  ... | prefix_offset ........ read_offset | new tokens ...
                 [-- already released text --)        [-- candidate text --)

   Decoding from prefix_offset (a few tokens back) rather than from the new token alone
   keeps tokenizers that drop a leading space (SentencePiece) or merge bytes correct.

2. Stop strings. Text that could still turn into a stop string (the longest suffix of the
   pending text that is a prefix of some stop) waits; it is released once it can no longer
   match, and dropped with everything after a stop that does match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pagedserve.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 5  # prompt tokens decoded ahead of the first output token


@dataclass(slots=True)
class DetokenizerDelta:
    text: str  # text newly safe to show
    stop: str | None = None  # the stop string that matched; the request is done


class IncrementalDetokenizer:
    """Turns each step's new token ids into releasable text for one request.

    Invariant: the concatenation of every `add(...).text` and the final `flush()` equals
    `tokenizer.decode(output_ids, skip_special_tokens)`, cut before the first stop string
    (or after it, with include_stop_str_in_output), less an incomplete character at the end.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prompt_len = len(context)
        self._pending = ""  # decoded, not yet released (may still become a stop string)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self.finished = False

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._prompt_len :]

    def add(self, token_ids: Sequence[int]) -> DetokenizerDelta:
        if self.finished:
            return DetokenizerDelta("")
        released: list[str] = []
        for token_id in token_ids:
            self._ids.append(token_id)
            self._pending += self._decode_new()
            delta = self._release()
            released.append(delta.text)
            if delta.stop is not None:
                self.finished = True
                return DetokenizerDelta("".join(released), delta.stop)
        return DetokenizerDelta("".join(released))

    def flush(self) -> str:
        """Everything held back, for a request that ended for another reason (length, EOS,
        abort). The tokens after read_offset end mid-character (else they would have been
        released): their complete characters are released, the incomplete one is dropped."""
        if self.finished:
            return ""
        self.finished = True
        prefix = self._decode(self._prefix_offset, self._read_offset)
        full = self._decode(self._prefix_offset, len(self._ids))
        text = self._pending + full[len(prefix) :].rstrip(_REPLACEMENT)
        self._pending = ""
        return text

    # ------------------------------------------------------------------------------------

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self._ids[start:end],
                                     skip_special_tokens=self.skip_special_tokens)

    def _decode_new(self) -> str:
        """Text the tokens after read_offset add, or "" while it ends mid-character."""
        prefix = self._decode(self._prefix_offset, self._read_offset)
        full = self._decode(self._prefix_offset, len(self._ids))
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""
        # A skipped special token decodes to nothing; the text still moves on.
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full[len(prefix) :]

    def _release(self) -> DetokenizerDelta:
        pending = self._pending
        if not self.stop:
            self._pending = ""
            return DetokenizerDelta(pending)
        match = self._find_stop(pending)
        if match is not None:
            index, stop = match
            end = index + len(stop) if self.include_stop_str_in_output else index
            self._pending = ""
            return DetokenizerDelta(pending[:end], stop)
        keep = self._partial_stop_length(pending)
        self._pending = pending[len(pending) - keep :]
        return DetokenizerDelta(pending[: len(pending) - keep])

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        """The earliest stop string in `text` (the longest one among those starting there)."""
        best: tuple[int, str] | None = None
        for stop in self.stop:
            index = text.find(stop)
            if index < 0:
                continue
            if best is None or index < best[0] or (index == best[0] and len(stop) > len(best[1])):
                best = (index, stop)
        return best

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that some stop string starts with."""
        for length in range(min(len(text), self._longest_stop - 1), 0, -1):
            suffix = text[-length:]
            if any(stop.startswith(suffix) for stop in self.stop):
                return length
        return 0
