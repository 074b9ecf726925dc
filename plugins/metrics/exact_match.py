"""Exact match: the share of predictions equal to their reference, after trimming and lower-casing.

An `evaluate` module that align ships, so that it loads offline: `evaluate.load(path_to_this_file)`.
"""

import datasets
import evaluate


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions and references: lists of strings",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        same = [p.strip().lower() == r.strip().lower() for p, r in zip(predictions, references, strict=True)]
        return {"exact_match": sum(same) / len(same) if same else 0.0}
