"""Toy-scale, CPU-only study of the TCD recipe (arXiv 2402.19159) against LCM and the teacher.

Small eps-prediction teachers are trained on real small data with the SD noise schedule (a 2-D Gaussian mixture and
class-conditional scikit-learn digits with classifier-free guidance); students are distilled from them with the
pack's own objectives (`tcd.losses`: LCM, and TCD with several target-time distributions and TCF orders) at equal
budget, and every student is sampled by every sampler (SSS with the pack's `tcd.sampling.sample_tcd`, first and
second order, and LCM's sampler); differences are graded by paired intervals over seeds. Run it with
`python -m benchmarks.paper_toy.run` from the repository root (or `make bench`); design in `run.py`.
"""
