"""Teachers: the EDM-convention :class:`~.denoiser.Denoiser` over any supported diffusers model, where teachers
come from (:mod:`.loading`), which family a teacher folder or hub id belongs to and whether the recipes support it
(:mod:`.families`), EDM's training loss and noise draw (:mod:`.edm`) and builders of small UNets."""
