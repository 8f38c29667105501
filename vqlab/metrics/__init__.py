"""The mathematics behind the evaluators that is worth testing on its own: the multi-scale sliced
Wasserstein distance (``swd``) and the Fréchet distance, Inception features and reference-statistics
cache (``fidelity``). ``vqlab.evaluators`` wraps them in the update/compute/reset contract."""
