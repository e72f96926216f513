"""Token ids -> text, one step at a time, with stop strings.

Two hold-backs make streamed text safe to show at once:

1. UTF-8. A character may span several byte tokens; decoding a prefix of them gives
   '\\ufffd'. The tokenizer's own incremental decoder (``tokenizers``' DecodeStream, which
   vLLM uses too) buffers such tokens and yields text only once it is whole; it starts from a
   few prompt tokens, so that tokenizers that drop a leading space (SentencePiece) or merge
   bytes decode the first output token as they would inside the text. An answer that ends
   inside a character (its max_tokens cut an emoji in two) drops the incomplete character
   rather than show '\\ufffd', as vLLM does. It costs about a microsecond a token, where
   decoding a window of recent tokens twice per token costs ten or more. That window is the
   fallback: DecodeStream refuses some sequences of byte tokens that never form valid UTF-8
   (random weights produce them; "Invalid prefix encountered"), and the request then goes on
   with the window, as vLLM's detokenizer does:

       ids:  ... | prefix_offset ........ read_offset | new tokens ...
                 [-- already released text --)        [-- candidate text --)

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
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.skip_special_tokens = skip_special_tokens
        self._backend = tokenizer.backend
        context = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self._ids = context  # the prompt context, then every output token
        self._num_context = len(context)
        self._held_from = len(context)  # tokens from here on have not shown their text yet
        self._pending = ""  # decoded, not yet released (may still become a stop string)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self.finished = False

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_context:]

    def add(self, token_ids: Sequence[int]) -> DetokenizerDelta:
        if self.finished:
            return DetokenizerDelta("")
        released: list[str] = []
        for token_id in token_ids:
            self._ids.append(token_id)
            text = self._step(token_id)
            if text is None:  # a character is incomplete: the decoder holds it
                continue
            self._held_from = len(self._ids)
            if not text:  # a skipped special token
                continue
            self._pending += text
            delta = self._release()
            released.append(delta.text)
            if delta.stop is not None:
                self.finished = True
                return DetokenizerDelta("".join(released), delta.stop)
        return DetokenizerDelta("".join(released))

    def flush(self) -> str:
        """Everything held back, for a request that ended for another reason (length, EOS,
        abort): text that might have begun a stop string, and the complete characters of the
        tokens the decoder still holds (a space before an emoji cut in two) are released; the
        incomplete character is dropped."""
        if self.finished:
            return ""
        self.finished = True
        text, self._pending = self._pending, ""
        if self._held_from < len(self._ids):
            start = max(0, self._held_from - _PROMPT_CONTEXT)
            before = self._decode(start, self._held_from)
            after = self._decode(start, len(self._ids))
            text += after[len(before):].rstrip(_REPLACEMENT)
        return text

    def _decode(self, start: int, end: int) -> str:
        return self._backend.decode(self._ids[start:end],
                                    skip_special_tokens=self.skip_special_tokens)

    def _step(self, token_id: int) -> str | None:
        """The text the newest token (already in ``_ids``) completes: None while a character
        is incomplete, "" for a skipped special token."""
        if self._stream is not None:
            try:
                return self._stream.step(self._backend, token_id)
            except Exception:  # noqa: BLE001 - DecodeStream's refusal: go on with the window
                self._stream = None
        # the window: decode from a few tokens before those still held, and release the text
        # they add unless it ends inside a character
        prefix_offset = max(0, self._held_from - _PROMPT_CONTEXT)
        prefix = self._decode(prefix_offset, self._held_from)
        full = self._decode(prefix_offset, len(self._ids))
        if full.endswith(_REPLACEMENT):
            return None
        return full[len(prefix):]

    # ------------------------------------------------------------------------------------

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
