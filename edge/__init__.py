"""The JEE1 device runtime: loads the GGUF with llama.cpp and answers (the ``jee1`` CLI)."""
