"""Tokenizer; 4-bit load -> Linear4bit targets -> LoRA/AdaLoRA (fused_lora: shared inputs on a CPU);
builtin and tiny models; generation."""
