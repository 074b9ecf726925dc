"""Corpus BLEU (Papineni et al. 2002): geometric mean of 1- to 4-gram precisions with a brevity penalty.

Whitespace tokens, lower-cased; one reference per prediction; add-one smoothing of the higher n-gram
precisions (Lin and Och 2004) so that short texts do not score 0. An `evaluate` module align ships, so
that it loads offline.
"""

import collections
import math

import datasets
import evaluate


def ngrams(tokens, n):
    return collections.Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Papineni et al., BLEU: a Method for Automatic Evaluation of Machine Translation, 2002",
            inputs_description="predictions and references: lists of strings",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, max_order=4):
        matches, totals = [0] * max_order, [0] * max_order
        prediction_length = reference_length = 0
        for prediction, reference in zip(predictions, references, strict=True):
            p, r = prediction.lower().split(), reference.lower().split()
            prediction_length += len(p)
            reference_length += len(r)
            for n in range(1, max_order + 1):
                found, wanted = ngrams(p, n), ngrams(r, n)
                matches[n - 1] += sum(min(count, wanted[gram]) for gram, count in found.items())
                totals[n - 1] += max(len(p) - n + 1, 0)
        if prediction_length == 0:
            return {"bleu": 0.0}
        precisions = [
            (matches[i] + (i > 0)) / (totals[i] + (i > 0)) if totals[i] + (i > 0) else 0.0 for i in range(max_order)
        ]
        if min(precisions) == 0:
            return {"bleu": 0.0}
        penalty = 1.0 if prediction_length > reference_length else math.exp(1 - reference_length / prediction_length)
        return {"bleu": penalty * math.exp(sum(math.log(p) for p in precisions) / max_order)}
