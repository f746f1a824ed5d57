"""Word error rate as the original Llama-AVSR reports it: lower-cased, whitespace-split, corpus level."""

from collections.abc import Sequence

import jiwer


def word_error_rate(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Total word edits (substitutions + deletions + insertions) over total reference words, across the whole list.

    Not the mean of per-utterance rates: long utterances weigh more, as in the paper's tables. An utterance with an
    empty reference contributes its hypothesis words as insertions.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("word_error_rate needs at least one reference")
    output = jiwer.process_words([r.lower() for r in references], [p.lower() for p in predictions])
    edits = output.substitutions + output.deletions + output.insertions
    reference_words = output.substitutions + output.deletions + output.hits
    if reference_words == 0:
        raise ValueError("word_error_rate is undefined when every reference is empty")
    return edits / reference_words


__all__ = ["word_error_rate"]
