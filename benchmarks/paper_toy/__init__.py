"""Toy-scale, CPU-only measurement of the TCD paper's claims (arXiv 2402.19159).

A small eps-prediction teacher is trained on real small data with the SD noise schedule, then LCM and TCD students
are distilled from it with the pack's own objectives (`tcd.losses`) at equal budget, and sampled with the pack's
`tcd.sampling.sample_tcd` (TCD), diffusers' LCMScheduler (LCM) and diffusers' DDIM / DPM-Solver++(2M) (teacher).
Run it with `python -m benchmarks.paper_toy.run` from the repository root (or `make bench`).
"""
