"""When a kohya caption tag names its adapter.

Many files come straight from kohya sd-scripts with no trigger field at all: the token the LoRA answers to lives
only in ``ss_tag_frequency``, written into every caption by the trainer, and the dataset folder is often called
``10_img``. The rule:

- A caption tag is a **caption name** of its adapter when it occurs in at least ``CAPTION_SHARE`` (80%) of the
  captions of one of the adapter's dataset folders, and that folder has at least ``MIN_CAPTIONS`` (5) captions
  (in a folder of two images every tag is in every caption).
- A caption tag that is a common descriptive word (:data:`COMMON_WORDS`: the class words DreamBooth-style training
  puts beside its token, "woman", "man", "1girl", "dog", and words for any picture, "portrait", "style") is never a
  caption name, however few adapters of the library carry it: "ohwx, woman" in every caption makes "ohwx" the name
  and "woman" a description, and a small library whose only adapter captioned "woman" has no adapter named "woman".
  The same holds for a kohya dataset folder named with such a word (``10_woman``). The regularization folders
  kohya lists in ``ss_reg_dataset_dirs`` name nothing (:mod:`weights_index.kohya_captions`).
- A caption name that other adapters use as a tag is a description of an adapter that has a caption name or trigger
  no other adapter uses as a tag (:meth:`retrieval.evidence.EvidenceIndex._demote_attributes`): "ohwx, red dress"
  is named by "ohwx" when another adapter is tagged "red dress".
- A caption name names its adapter only when few adapters of the library carry the phrase at all: at most
  ``MAX_CARRIERS`` (3), counting those that carry it as a name of any kind and those that carry it only as a tag. A
  token shared by many adapters ("1girl" in every caption, or one trigger token many trainers reuse) names none.
- Its strength (:attr:`retrieval.evidence.Phrase.weight` applied in :meth:`retrieval.evidence.EvidenceIndex.match`)
  is the phrase's library specificity (:func:`retrieval.evidence.specificity`) times its share of the captions: both
  how few adapters carry it and how consistently its own captions do count. Like every identity, it justifies a pick
  only at ``retrieval.selection.IDENTITY_THRESHOLD`` or above, and it is demoted to a description when many more
  adapters use it as a tag than as a name (``retrieval.evidence.DESCRIPTION_RATIO``).

The thresholds were chosen on the ``tuned`` configuration of ``benchmarks/realistic_library.py``; its ``held_out``
configuration and the ComposLoRA-style library (``benchmarks/composlora_library.py``) check them and set none of
them. :data:`COMMON_WORDS` is a fixed list of everyday words, not drawn from either benchmark's vocabulary.
"""

from __future__ import annotations

from weights_index.kohya_captions import CaptionPresence
from weights_index.metadata import AdapterMetadata
from weights_index.naming import content_words

CAPTION_SHARE = 0.8
"""Least share of a folder's captions holding a tag for the tag to be a caption name."""
MIN_CAPTIONS = 5
"""Least number of captions in the folder."""
MAX_CARRIERS = 3
"""Most adapters in the library that may carry a caption name's phrase (in any way) for it to name its adapter."""
COMMON_WORDS = frozenset(
    {
        # who: the class words of DreamBooth-style training and the booru subject tags
        "woman",
        "women",
        "man",
        "men",
        "girl",
        "girls",
        "boy",
        "boys",
        "lady",
        "guy",
        "person",
        "people",
        "human",
        "child",
        "kid",
        "female",
        "male",
        "1girl",
        "1boy",
        "2girls",
        "2boys",
        "solo",
        "dog",
        "cat",
        "animal",
        # what any picture is
        "face",
        "portrait",
        "photo",
        "photograph",
        "picture",
        "image",
        "illustration",
        "drawing",
        "painting",
        "artwork",
        "style",
        "character",
        "object",
        "background",
        "scenery",
    }
)
"""Common descriptive words: in every caption they describe the images, they never name the adapter."""


def is_common(phrase: str) -> bool:
    """Whether ``phrase`` is, in its content words, one of :data:`COMMON_WORDS` ("Woman", "a portrait")."""
    return " ".join(content_words(phrase)) in COMMON_WORDS


def caption_names(meta: AdapterMetadata) -> list[tuple[str, CaptionPresence]]:
    """The caption tags of one adapter that are consistent enough to name it and are no common word (before the
    library is consulted)."""
    found = []
    for tag in meta.caption_presence:
        if is_common(tag):
            continue
        presence = meta.presence(tag)
        if presence is not None and presence.captions >= MIN_CAPTIONS and presence.share >= CAPTION_SHARE:
            found.append((tag, presence))
    return found


def names_its_adapter(carriers: int) -> bool:
    """Whether a caption name carried by ``carriers`` adapters of the library (as a name or a tag) names one."""
    return carriers <= MAX_CARRIERS
