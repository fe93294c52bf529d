"""The embedded text-to-image teacher's parts: the MiniLM text encoder from its wheel, folder assembly, builders."""
