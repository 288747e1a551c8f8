"""The vision-only labeller behind concept dictionaries: tagger, detector, segmenter, evaluator."""
