"""Writing what training produced as diffusers folders with model cards: one-step generators, rectified-flow
models, plug-in SiD-LoRA adapters, and pushing any of them to a hub repo (``onestep publish``)."""
