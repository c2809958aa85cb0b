"""``jee1 eval``: the SM70 benchmarks (MedQA-USMLE, PubMedQA, USMLE sample exam) on a GGUF, run
through the device engine, and the quantization quality gate (KL divergence against F16)."""
