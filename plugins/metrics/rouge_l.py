"""ROUGE-L (Lin 2004): F-measure of the longest common subsequence of words, averaged over pairs.

Whitespace tokens, lower-cased. An `evaluate` module align ships, so that it loads offline.
"""

import datasets
import evaluate


def lcs(a, b):
    row = [0] * (len(b) + 1)
    for x in a:
        previous = 0
        for j, y in enumerate(b, start=1):
            previous, row[j] = row[j], previous + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004",
            inputs_description="predictions and references: lists of strings",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        scores = []
        for prediction, reference in zip(predictions, references, strict=True):
            p, r = prediction.lower().split(), reference.lower().split()
            common = lcs(p, r)
            if not p or not r or common == 0:
                scores.append(0.0)
                continue
            precision, recall = common / len(p), common / len(r)
            scores.append(2 * precision * recall / (precision + recall))
        return {"rouge_l": sum(scores) / len(scores) if scores else 0.0}
