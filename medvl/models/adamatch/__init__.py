"""AdaMatch: adaptive patch-word matching between chest X-rays and reports.

By job:

* :mod:`~medvl.models.adamatch.patches` - AdaPatch, the adaptive patch layer and :class:`ImagePatches`;
* :mod:`~medvl.models.adamatch.encoders` - image backbones and the report (text) encoder;
* :mod:`~medvl.models.adamatch.losses` - the token-wise InfoNCE scores and losses (gathered across ranks);
* :mod:`~medvl.models.adamatch.model` - :class:`AdaMatch` and its config;
* :mod:`~medvl.models.adamatch.mining` - the keyword vocabulary and the keypatch bank;
* :mod:`~medvl.models.adamatch.run` - :class:`AdaMatchRun`, the inference API the heads use, saved as the
  ``adamatch/`` component of a run.
"""

from medvl.models.adamatch.losses import (
    contrastive_loss,
    select_words,
    token_scores,
    word_identities,
    word_loss,
    word_order,
)
from medvl.models.adamatch.mining import (
    KeypatchBank,
    KeywordVocabulary,
    MiningConfig,
    build_keywords_and_bank,
    crop_boxes,
    mine_vocabulary,
)
from medvl.models.adamatch.model import AdaMatch, AdaMatchConfig, TextTokens, build_adamatch
from medvl.models.adamatch.patches import ImagePatches, PatchMode
from medvl.models.adamatch.run import AdaMatchRun, Keypatches, Keyword

__all__ = [
    "AdaMatch",
    "AdaMatchConfig",
    "AdaMatchRun",
    "ImagePatches",
    "TextTokens",
    "Keyword",
    "Keypatches",
    "KeywordVocabulary",
    "KeypatchBank",
    "MiningConfig",
    "PatchMode",
    "build_adamatch",
    "build_keywords_and_bank",
    "crop_boxes",
    "mine_vocabulary",
    "token_scores",
    "contrastive_loss",
    "select_words",
    "word_identities",
    "word_loss",
    "word_order",
]
