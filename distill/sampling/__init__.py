"""Sampling: ODE solvers for teachers (:mod:`.ode`) and the k-step student sampler (:mod:`.student`)."""
