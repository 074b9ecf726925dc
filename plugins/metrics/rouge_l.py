"""ROUGE-L as rouge-score computes it: the F-measure of the longest common subsequence, averaged over pairs.

``rouge_scorer.RougeScorer(["rougeL"])`` with its defaults, which are also those of Hugging Face evaluate's
``rouge``: lower-cased, every run of characters other than a-z and 0-9 is a separator (so punctuation does
not count, and letters outside a-z are dropped: text in another script scores 0), no stemming. The score is
the plain mean over pairs, where evaluate's ``rouge`` reports a bootstrap estimate of it. On a 0-1 scale.
An `evaluate` module align ships, so that it loads offline; rouge-score is one of align's dependencies.
"""

import datasets
import evaluate

from align import AlignError

try:  # indented, so that evaluate's own import check leaves the message to align
    from rouge_score import rouge_scorer
except ImportError:
    raise AlignError(
        "task metric 'rouge_l' needs the package rouge-score, which is not installed",
        hint="pip install 'rouge-score>=0.1.2,<0.2' (a dependency of align, missing after an install with --no-deps)",
    ) from None


class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004",
            inputs_description="predictions and references: lists of strings, one reference per prediction",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(["rougeL"])
        scores = [
            scorer.score(reference, prediction)["rougeL"].fmeasure
            for prediction, reference in zip(predictions, references, strict=True)
        ]
        return {"rouge_l": sum(scores) / len(scores) if scores else 0.0}
