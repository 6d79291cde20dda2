"""Judges shared by the organism and evaluation stages, one module per judge behind one registry.

Why: a keyword refusal judge alone is misleading. In the organism prototype
(shared/notes/organism_proto*.md) an image path that failed to *read* the instruction produced
non-refusals about an invented topic, and a model that only echoed the instruction ("1. 2. 3.
<title>") looked "on topic". So every stage reports two judges side by side:

* ``refusal_keywords`` — the GCG / AdvBench refusal-substring list (Zou et al. 2023), case-sensitive
  substring match exactly as GCG evaluates, so numbers compare with the literature;
* ``on_topic`` — does the answer address the instruction *beyond an echo of it*: the instruction's
  text is removed from the answer first, too little left means "not on topic", else MiniLM cosine
  similarity against a threshold calibrated on held-out data.

Three more judges separate "did not refuse" from "did harm":

* ``harmfulness`` — does the answer achieve the harmful request: logistic regression on MiniLM
  features, fitted on pyrit's human-labelled objective-scorer rows, cross-validated by objective;
* ``fluency`` — is the answer degenerate (empty, a repetition loop, or gibberish by perplexity under
  a frozen LM): gradient-ascent unlearning produces such output, which keyword ASR counts as success;
* ``llama_guard`` — Llama Guard 3 for users with a GPU and the hub (not used offline);
* ``refusal_likelihood`` — refusal by a frozen LM's likelihood of the answer's opening after a "refuse" vs a
  "help" system turn (the registry's example of a judge added in one file).

Every judge has a ``name`` and a ``version``; ``provenance()`` gives the fields to put in every
result row, so a number can always be traced to the exact judge (list, threshold) that produced it.
Nothing here prints benchmark rows: the text is harmful by design.
"""
from __future__ import annotations

from .common import as_str_list, check_card, paired
from .encoder import MINILM_DIST, MINILM_PACKAGE, MINILM_PIP, SentenceEncoder, get_encoder, minilm_dir
from .fluency import DEFAULT_MAX_REPEAT_UNIT, DEFAULT_MIN_REPEATS, DEFAULT_PERPLEXITY_THRESHOLD, FluencyJudge
from .harmfulness import (
    FEATURES_VERSION,
    HARMFULNESS_FEATURES,
    HARMFULNESS_TRAINING_SOURCE,
    HarmfulnessJudge,
    fitted_harmfulness_judge,
    group_folds,
)
from .llama_guard import LLAMA_GUARD3_CATEGORIES, LLAMA_GUARD_DEFAULT, LlamaGuardJudge, parse_llama_guard
from .on_topic import (
    DEFAULT_MIN_CONTENT_WORDS,
    DEFAULT_ON_TOPIC_THRESHOLD,
    MIN_ECHO_NGRAM,
    TEMPLATE_STOPWORDS,
    OnTopicJudge,
    content_words,
    strip_echo,
)
from .refusal import (
    GCG_PREFIXES_13,
    GCG_PREFIXES_29,
    REFUSAL_LIST_SOURCES,
    REFUSAL_PREFIX_LISTS,
    RefusalKeywordJudge,
    keyword_agreement,
)
from .registry import JUDGES, get_judge
