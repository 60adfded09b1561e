"""ClinicalVLM generation through the fast decoder (assistant.fast_decode), once it is ready.

`FastGeneration.start()` builds the decoder in a background thread: with the native step, a few
seconds (its C++ kernel is built once per machine, then loaded from the cache); with the
compiled torch step, about a minute the first time on 2 cores and seconds once Inductor's on-disk
cache holds it. Until then, and for anything the decoder does not implement (batches, other
architectures, prompts past its cache), `ClinicalVLM.stream` keeps using transformers'
`generate`. Nobody waits for a build or a compile.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import torch

from .config import GenerationConfig
from .fast_check import Shortlist
from .fast_decode import FastDecoder
from .fast_weights import FastDecodeUnsupported

log = logging.getLogger(__name__)


class FastGeneration:
    def __init__(self, vlm, compile: bool = True, max_positions: int = 4096):
        self.vlm = vlm
        self.compile = compile
        self.max_positions = max_positions
        self.decoder: FastDecoder | None = None
        self.ready = threading.Event()
        self.failure: str | None = None
        self._thread: threading.Thread | None = None

    def start(self, wait: bool = False) -> "FastGeneration":
        """Build and warm the decoder in the background (`wait`: block until done)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._warm, name="fast-decode-warmup", daemon=True)
            self._thread.start()
        if wait:
            self._thread.join()
        return self

    def _warm(self) -> None:
        try:
            text_model = self.vlm._base_model().model.language_model
            decoder = FastDecoder(text_model, self.max_positions, compile=self.compile,
                                  shortlist=self._shortlist(text_model.config.vocab_size))
            adapters = self.vlm.adapter_names()
            for adapter in adapters:
                decoder.weights_for(adapter)  # each adapter's weights once, before the first request
            with torch.inference_mode():
                decoder.warm_up(adapters[0])
            self.decoder = decoder
            self.ready.set()
            log.info("fast decoding ready (%s step)", decoder.kernel)
        except FastDecodeUnsupported as err:
            self.failure = str(err)
            log.info("fast decoding off: %s", err)
        except Exception as err:  # a compile failure must never take generation down: generate() remains
            self.failure = f"{type(err).__name__}: {err}"
            log.warning("fast decoding unavailable, using transformers generate: %s", self.failure)

    def _shortlist(self, vocab_size: int) -> Shortlist | None:
        """The configured vocabulary shortlist, or None (every row scored) when unset or unusable."""
        from .model import repo_path
        from .vocab_shortlist import ShortlistError, load

        path = self.vlm.config.generation.shortlist
        if not path:
            return None
        try:
            return Shortlist(load(repo_path(path), vocab_size))
        except ShortlistError as err:
            log.warning("fast decoding scores every output row: %s", err)
            return None

    def usable(self, inputs: dict[str, torch.Tensor], gen: GenerationConfig) -> bool:
        ids = inputs["input_ids"]
        return (self.ready.is_set() and ids.shape[0] == 1
                and self.decoder.fits(ids.shape[1], gen.max_new_tokens))

    def pieces(self, inputs: dict[str, torch.Tensor], gen: GenerationConfig, stop: tuple[str, ...],
               adapter: str | None) -> Iterator[str]:
        """Text pieces of one generation. The caller holds the model's adapter lock."""
        yield from TextPieces(self.vlm.tokenizer, stop).feed(self.tokens(inputs, gen, adapter))

    def tokens(self, inputs: dict[str, torch.Tensor], gen: GenerationConfig, adapter: str | None,
               eos_ids: tuple[int, ...] | None = None) -> Iterator[int]:
        """New token ids: the prompt's input embeddings (image tokens through the vision tower and
        projector of the active adapter) at the first `next`, then the decoder's prefill and steps.
        `eos_ids` None: the model's own; () runs to the limit."""
        with torch.inference_mode():
            embeds = prompt_embeddings(self.vlm, inputs)
        if eos_ids is None:
            eos_ids = eos_token_ids(self.vlm.hf.generation_config.eos_token_id)
        yield from self.decoder.decode(adapter, embeds, inputs["input_ids"][0], gen.max_new_tokens,
                                       gen.repetition_penalty, gen.temperature, eos_ids, sampling_generator(gen))


def sampling_generator(gen: GenerationConfig) -> torch.Generator | None:
    """A generator seeded with `gen.seed` for a sampled generation (None: greedy or unseeded)."""
    if gen.temperature <= 0 or gen.seed is None:
        return None
    return torch.Generator().manual_seed(gen.seed)


def eos_token_ids(eos: int | list[int] | tuple[int, ...] | None) -> tuple[int, ...]:
    """A generation config's eos_token_id (one id, a list of them, or None) as a tuple of ids."""
    ids = eos if isinstance(eos, (list, tuple)) else [eos]
    return tuple(i for i in ids if i is not None)


def prompt_embeddings(vlm, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(T, hidden) input embeddings of one prompt, as transformers' LLaVA forward builds them: the
    text model's (scaled) token embeddings, with the projected image features scattered into the
    image placeholder positions (transformers' own mask, which checks the counts)."""
    model = vlm._base_model()
    input_ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(input_ids)
    if inputs.get("pixel_values") is not None:
        features = vlm.image_features(inputs["pixel_values"]).flatten(0, 1).to(embeds.dtype)  # (images x N, D)
        mask = model.model.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=features)
        embeds = embeds.masked_scatter(mask, features)
    return embeds[0]


class TextPieces:
    """Incremental detokenisation: each new token's text as it becomes whole (a byte-fallback
    character split over tokens waits for its last byte), ending after a stop string appears."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, stop

    def feed(self, tokens: Iterator[int]) -> Iterator[str]:
        ids: list[int] = []
        sent = ""
        for token in tokens:
            ids.append(token)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue
            if len(text) > len(sent):
                yield text[len(sent):]
                sent = text
            if self.stop and any(stop in sent for stop in self.stop):
                return


