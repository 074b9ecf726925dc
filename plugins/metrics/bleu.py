"""Corpus BLEU as sacrebleu computes it, on a 0-1 scale (sacrebleu's score / 100).

``sacrebleu.corpus_bleu`` with its defaults: the 13a tokenizer (punctuation split off, as WMT does), case
kept, exponential smoothing, one reference per prediction. The numbers are the ones papers report, divided
by 100 so that BLEU reads on the same 0-1 scale as align's other task metrics. An `evaluate` module align
ships, so that it loads offline; sacrebleu is one of align's dependencies.
"""

import datasets
import evaluate

from align import AlignError

try:  # indented, so that evaluate's own import check leaves the message to align
    import sacrebleu
except ImportError:
    raise AlignError(
        "task metric 'bleu' needs the package sacrebleu, which is not installed",
        hint="pip install 'sacrebleu>=2.6,<3' (a dependency of align, missing after an install with --no-deps)",
    ) from None


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Post, A Call for Clarity in Reporting BLEU Scores, 2018; "
            "Papineni et al., BLEU: a Method for Automatic Evaluation of Machine Translation, 2002",
            inputs_description="predictions and references: lists of strings, one reference per prediction",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        if not predictions:  # sacrebleu fails on an empty corpus
            return {"bleu": 0.0}
        return {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score / 100}
