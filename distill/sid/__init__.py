"""Score identity Distillation (Zhou et al. 2024): the losses (:mod:`.losses`), SiDA's discriminator read off the
fake score (:mod:`.discriminator`) and LoRA students on one shared teacher (:mod:`.lora_student`)."""
