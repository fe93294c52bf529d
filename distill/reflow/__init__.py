"""Rectified flow / reflow (Liu et al. 2023): flow-time maths and samplers (:mod:`.flow`) and the teacher's
noise-image pairs, generated resumably to disk (:mod:`.pairs`)."""
