"""The benchmark suite of misa-kernels: ``python -m bench [--quick]`` from the repository root.

MISA against full AdamW, BAdam, LoRA and GaLore on one LLaMA-style model: step latency
(paper Table 8), training memory, fine-tuning and pre-training convergence (Table 6, Fig.
3/4) and plots. See ``bench/README.md``.
"""
