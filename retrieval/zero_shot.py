"""Training-free retrieval from the weights: how strongly an adapter's cross-attention LoRA reacts to a prompt.

The down matrix A of a LoRA on a cross-attention key/value projection (``attn2.to_k/to_v`` in UNets, the context
projections ``attn.add_k_proj/add_v_proj`` in Flux) is applied to the text encoder's token states, so ΔW·h for the
prompt's token states h says how much the adapter changes what the image attends to for *this* prompt. Training
pushes A's rows towards the states its training captions produce, so an adapter reacts most to prompts about its
concept.

The response is computed without forming ΔW: per layer, ‖ΔW h‖ = ‖s·R_B·A·h‖ where Q_B R_B is the QR of the up
factor, and the stacked rows of every such layer are compressed, exactly, by one SVD into a small basis M with
Σ_ℓ ‖ΔW_ℓ h‖² = ‖M h‖². A prompt's response is the mean of ‖M (h − μ)‖² over the token states that summarise it —
the end-of-text token and the padding after it (:class:`PipelineTokenEncoder`) — with μ the mean of every token
state of the neutral prompts (what every prompt shares). The score is the response's z-score against the adapter's
responses to a fixed set of ordinary prompts: scale-free, 0 means "reacts as to any prompt", large means the prompt
speaks to this adapter. Measured on 40 trained LoRAs (``benchmarks/retrieval_eval.py``; the choices were made on
phrasings other than the evaluation's): recall@3 0.86 this way, 0.71 with μ taken over the summary states only,
0.30 with every state scored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from fusion.adapters import Adapter, LowRank
from weights_index.families import pipeline_family

CROSS_ATTENTION_SUFFIXES = ("attn2.to_k", "attn2.to_v", "attn.add_k_proj", "attn.add_v_proj")
"""Layer key endings whose input is the text encoder's token states."""

NEUTRAL_TEMPLATES = (
    "a photo of a {}",
    "a {} in a room",
    "a picture of the {}",
    "{}, detailed, high quality",
    "an old {} on the ground",
    "a painting of a {} at night",
)
NEUTRAL_SUBJECTS = ("dog", "house", "car", "tree", "person", "chair", "flower", "city")
NEUTRAL_PROMPTS = tuple(template.format(subject) for template in NEUTRAL_TEMPLATES for subject in NEUTRAL_SUBJECTS)
"""Ordinary prompts about ordinary things (varied phrasing and subjects): each adapter's baseline distribution."""

DEFAULT_MAX_RANK = 64

TokenEncoder = Callable[[str], torch.Tensor]
"""A function prompt → (tokens, width) token states, as the denoiser's cross-attention reads them. It may also have
a ``summary_start(prompt) -> int`` method (see :class:`PipelineTokenEncoder`): responses then use only the states
from that index on, while the centre μ stays the mean of every neutral state."""


def reads_text_states(key: str) -> bool:
    """True for denoiser layers whose input is the text encoder's token states (cross-attention keys/values)."""
    return key.endswith(CROSS_ATTENTION_SUFFIXES)


def response_basis(adapter: Adapter, max_rank: int = DEFAULT_MAX_RANK) -> torch.Tensor | None:
    """A (≤max_rank, width) matrix M with ‖M h‖² = Σ_ℓ ‖ΔW_ℓ h‖² over the adapter's cross-attention k/v layers.

    Exact when the stacked rank is at most ``max_rank`` (otherwise the best rank-``max_rank`` approximation of the
    quadratic form). None when the adapter has no cross-attention key/value layer, or their input widths differ.
    """
    rows = []
    for key, update in adapter.layers.items():
        if not reads_text_states(key):
            continue
        if isinstance(update, LowRank) and not update.is_conv:
            _, r_up = torch.linalg.qr(update.up.double())
            rows.append(update.scale * (r_up @ update.down.double()))
        else:
            delta = update.delta(torch.float64)
            rows.append(delta.reshape(delta.shape[0], -1))
    if not rows or len({row.shape[1] for row in rows}) != 1:
        return None
    _, singular, vh = torch.linalg.svd(torch.cat(rows), full_matrices=False)
    keep = min(max_rank, singular.numel())
    return (singular[:keep, None] * vh[:keep]).float()


def mean_response(bases: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ‖M h‖² for a batch of bases (N, r, d) and token states (T, d) → (N,).

    Bases of different ranks are zero-padded along r (padding rows add nothing).
    """
    projected = torch.einsum("nrd,td->ntr", bases, states.to(bases.dtype))
    return projected.pow(2).sum(-1).mean(-1)


def stack_bases(bases: Sequence[torch.Tensor]) -> torch.Tensor:
    """Zero-pad bases to a common rank and stack them into (N, r, d)."""
    rank = max(b.shape[0] for b in bases)
    out = torch.zeros(len(bases), rank, bases[0].shape[1], dtype=bases[0].dtype)
    for i, basis in enumerate(bases):
        out[i, : basis.shape[0]] = basis
    return out


class ZeroShotScorer:
    """Scores adapters against prompts by cross-attention response; caches each adapter's basis and baseline.

    ``encode`` turns a prompt into token states (see :func:`pipeline_token_encoder`). Adapters without
    cross-attention key/value layers, or made for another text width, are not added (:meth:`add` returns False).
    """

    def __init__(
        self,
        encode: TokenEncoder,
        neutral_prompts: Iterable[str] = NEUTRAL_PROMPTS,
        *,
        max_rank: int = DEFAULT_MAX_RANK,
    ) -> None:
        self.encode = encode
        self.max_rank = max_rank
        prompts = list(neutral_prompts)
        neutral = [encode(prompt).float() for prompt in prompts]
        self.center = torch.cat(neutral).mean(0)
        self.neutral_states = [
            states[self._summary_start(prompt) :] - self.center for prompt, states in zip(prompts, neutral)
        ]
        self.width = int(self.center.shape[0])
        self._names: list[str] = []
        self._bases: list[torch.Tensor] = []
        self._baselines: list[tuple[float, float]] = []
        self._stacked: torch.Tensor | None = None

    @property
    def names(self) -> list[str]:
        """Names of the adapters that can be scored."""
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def add(self, name: str, adapter: Adapter) -> bool:
        """Cache the adapter's response basis and neutral baseline (mean, spread); False when it cannot be scored."""
        basis = response_basis(adapter, self.max_rank)
        if basis is None or basis.shape[1] != self.width:
            return False
        responses = torch.stack([mean_response(basis[None], states)[0] for states in self.neutral_states])
        baseline = (float(responses.mean()), float(responses.std()))
        if not baseline[1] > 0.0:
            return False
        self.remove(name)
        self._names.append(name)
        self._bases.append(basis)
        self._baselines.append(baseline)
        self._stacked = None
        return True

    def remove(self, name: str) -> None:
        """Forget an adapter (no-op when unknown)."""
        if name in self._names:
            where = self._names.index(name)
            for cached in (self._names, self._bases, self._baselines):
                del cached[where]
            self._stacked = None

    def _summary_start(self, prompt: str) -> int:
        start = getattr(self.encode, "summary_start", None)
        return 0 if start is None else int(start(prompt))

    def prompt_states(self, prompt: str) -> torch.Tensor:
        """The prompt's token states that are scored (its summary states when the encoder knows them), centred."""
        return self.encode(prompt).float()[self._summary_start(prompt) :] - self.center

    def scores(self, prompt: str) -> dict[str, float]:
        """Response z-score (prompt vs ordinary prompts) of every added adapter; empty when none was added."""
        if not self._names:
            return {}
        if self._stacked is None:
            self._stacked = stack_bases(self._bases)
        responses = mean_response(self._stacked, self.prompt_states(prompt))
        baselines = torch.tensor(self._baselines, dtype=responses.dtype)
        return dict(zip(self._names, ((responses - baselines[:, 0]) / baselines[:, 1]).tolist()))


def _end_of_text(tokenizer: Any, prompt: str, max_length: int) -> int:
    """Index of the end-of-text token in the tokenised prompt (truncated as the pipeline truncates it)."""
    return max(0, len(tokenizer(prompt, max_length=max_length, truncation=True).input_ids) - 1)


class PipelineTokenEncoder:
    """A :data:`TokenEncoder` using a pipeline's own text encoder(s): states exactly as its denoiser reads them.

    SD 1.x/2.x: the CLIP states from ``encode_prompt``; SDXL: both CLIP encoders' states concatenated, as
    ``encode_prompt`` builds them; Flux: the T5 states through the transformer's ``context_embedder`` and a plain
    layer norm (the timestep modulation of the context stream is left out). Every position is kept except CLIP's
    start token, whose state is the same for every prompt.

    :meth:`summary_start` tells where the states that summarise the prompt begin: the end-of-text token and the
    padding after it have read the whole prompt (CLIP is causal; T5 runs unmasked over the padding), so they carry
    what the prompt is about whatever its phrasing, and they are most of what a LoRA's cross-attention sees in
    training; the word tokens' own states depend on their position and neighbours and swamp a mean over all states.
    """

    def __init__(self, pipe: Any, *, max_sequence_length: int = 512) -> None:
        self.pipe = pipe
        self.family = pipeline_family(pipe)
        self.max_sequence_length = max_sequence_length

    @torch.no_grad()
    def __call__(self, prompt: str) -> torch.Tensor:
        pipe = self.pipe
        if self.family == "flux":
            embeds, _, _ = pipe.encode_prompt(
                prompt=prompt,
                prompt_2=None,
                device=pipe.device,
                num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
            )
            context = pipe.transformer.context_embedder(embeds.to(pipe.transformer.dtype))[0].float()
            return torch.nn.functional.layer_norm(context, context.shape[-1:]).cpu()
        output = pipe.encode_prompt(
            prompt=prompt, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return output[0][0, 1:].float().cpu()

    def summary_start(self, prompt: str) -> int:
        """Index, in the states :meth:`__call__` returns, of the prompt's end-of-text token."""
        if self.family == "flux":
            return _end_of_text(self.pipe.tokenizer_2, prompt, self.max_sequence_length)
        return max(0, _end_of_text(self.pipe.tokenizer, prompt, self.pipe.tokenizer.model_max_length) - 1)


def pipeline_token_encoder(pipe: Any, *, max_sequence_length: int = 512) -> PipelineTokenEncoder:
    """The :class:`PipelineTokenEncoder` of a diffusers pipeline (SD 1.x/2.x, SDXL or Flux)."""
    return PipelineTokenEncoder(pipe, max_sequence_length=max_sequence_length)
