"""The benchmark: our loop against the HF Trainer + PEFT baseline and torchkeras' KerasModel.

Every peer trains the same 4-bit NF4 model with the same LoRA config, data (tokenized once by
qlora_loop.data, so labels train exactly the assistant tokens for all), epochs, optimizer
(bitsandbytes paged_adamw_32bit), lr, warmup + cosine schedule, batch size and max length. Runs
alternate (ours, hf, torchkeras, ours, ...), each in its own fresh process, so peak memory
(memory.peak_memory_bytes: CUDA's max allocated, or the process's peak resident set on a CPU)
belongs to that run alone.

Measured the same way for every peer:
  step time       wall time of forward + backward + optimizer step, summed over optimizer steps
                  (ours: fit's timer around the StepRunner; HF: on_step_begin -> on_step_end; torchkeras:
                  around its StepRunner call); data loading, evaluation and saving are outside it
  loop time       the whole training loop (per-epoch evaluation and saving included), model load excluded
  tokens/s        loss-bearing (target) tokens / step time, and non-padding tokens / step time
  padding share   padding positions / all positions of the training batches
  train loss      mean loss per target token over the last epoch's steps
  eval loss       mean loss per target token on the held-out rows, after training (fit.evaluate)

The modules, in the order a run goes through them:
  settings     Settings (scripts/bench.py's flags), the --quick, --real and --gpu-7b presets, the peer names
  orchestrate  run_bench: inputs -> alternating runs in fresh processes -> the report
  inputs       the model (tiny, or Qwen2.5-7B-shaped with random weights) and the rows
  worker       one peer, once, in its own process
  ours         our peer: qlora_loop.run.train
  tutorial     the HF Trainer + PEFT and torchkeras peers, as their tutorials write them
  measure      counts, losses and rates every peer shares
  peak         the machine's matmul peak per dtype, measured before the runs
  bounds       model FLOPs per token; the --gpu-7b mode's analytic memory floor and FLOP bound
  report       medians, ratios ours / peer, targets, shares of the peak, the table
  step_time    (apart from the runs) seconds per StepRunner step for each way of running it
"""
