"""When a kohya caption tag names its adapter.

Many files come straight from kohya sd-scripts with no trigger field at all: the token the LoRA answers to lives
only in ``ss_tag_frequency``, written into every caption by the trainer, and the dataset folder is often called
``10_img``. The rule:

- A caption tag is a **caption name** of its adapter when it occurs in at least ``CAPTION_SHARE`` (80%) of the
  captions of one of the adapter's dataset folders, and that folder has at least ``MIN_CAPTIONS`` (5) captions
  (in a folder of two images every tag is in every caption).
- A caption name names its adapter only when few adapters of the library carry the phrase at all: at most
  ``MAX_CARRIERS`` (3), counting those that carry it as a name of any kind and those that carry it only as a tag. A
  token shared by many adapters ("1girl" in every caption, or one trigger token many trainers reuse) names none.
- Its strength (:attr:`retrieval.evidence.Phrase.weight` applied in :meth:`retrieval.evidence.EvidenceIndex.match`)
  is the phrase's library specificity (:func:`retrieval.evidence.specificity`) times its share of the captions: both
  how few adapters carry it and how consistently its own captions do count. Like every identity, it justifies a pick
  only at ``retrieval.selection.IDENTITY_THRESHOLD`` or above, and it is demoted to a description when many more
  adapters use it as a tag than as a name (``retrieval.evidence.DESCRIPTION_RATIO``).

The thresholds were chosen on the ``tuned`` configuration of ``benchmarks/realistic_library.py``; the ``held_out``
configuration and the ComposLoRA-style library (``benchmarks/composlora_library.py``) chose nothing.
"""

from __future__ import annotations

from weights_index.kohya_captions import CaptionPresence
from weights_index.metadata import AdapterMetadata

CAPTION_SHARE = 0.8
"""Least share of a folder's captions holding a tag for the tag to be a caption name."""
MIN_CAPTIONS = 5
"""Least number of captions in the folder."""
MAX_CARRIERS = 3
"""Most adapters in the library that may carry a caption name's phrase (in any way) for it to name its adapter."""


def caption_names(meta: AdapterMetadata) -> list[tuple[str, CaptionPresence]]:
    """The caption tags of one adapter that are consistent enough to name it (before the library is consulted)."""
    found = []
    for tag in meta.caption_presence:
        presence = meta.presence(tag)
        if presence is not None and presence.captions >= MIN_CAPTIONS and presence.share >= CAPTION_SHARE:
            found.append((tag, presence))
    return found


def names_its_adapter(carriers: int) -> bool:
    """Whether a caption name carried by ``carriers`` adapters of the library (as a name or a tag) names one."""
    return carriers <= MAX_CARRIERS
