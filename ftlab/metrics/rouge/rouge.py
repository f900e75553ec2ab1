"""ROUGE-L (and ROUGE-1/2) F-measure via Google's rouge-score, as an `evaluate` metric."""
import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = "ROUGE F-measures aggregated over the corpus (mean of per-example scores)."
_KWARGS = "predictions: list of str; references: list of str; rouge_types: list; use_stemmer: bool"


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, 2004. ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, rouge_types=("rouge1", "rouge2", "rougeL"), use_stemmer=False):
        scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
        totals = {t: 0.0 for t in rouge_types}
        for ref, pred in zip(references, predictions):
            scores = scorer.score(ref, pred)
            for t in rouge_types:
                totals[t] += scores[t].fmeasure
        n = max(len(predictions), 1)
        return {t: totals[t] / n for t in rouge_types}
