"""Judging a fine-tune by what it answers: metrics on generated replies (eval.metrics while training,
and the same functions as rewards), and `qlora-loop eval`, the adapter scored beside its base."""
