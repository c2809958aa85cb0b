"""jee1-convert: Hugging Face Llama-2 checkpoint + PEFT LoRA adapter -> verified GGUF (workstation)."""
