"""A trained adapter in use: chat, merge into the base, export as GGUF with an Ollama Modelfile."""
