"""Loss functions, the StepRunner (one optimizer step), optimizer and schedule, fit, checkpoints, memory
and disk checks, the multi-process launch, the dry run, and torchkeras driving the StepRunner."""
