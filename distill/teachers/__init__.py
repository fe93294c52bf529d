"""Teachers: the EDM-convention :class:`~.denoiser.Denoiser` over any supported diffusers model, where teachers
come from (:mod:`.loading`), EDM's training loss and noise draw (:mod:`.edm`) and builders of small UNets."""
