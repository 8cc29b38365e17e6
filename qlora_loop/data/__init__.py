"""Sources -> rows -> chat template and label masks -> the tokenized cache -> mixtures -> batches; the audit
of label masks and the data inspector."""
