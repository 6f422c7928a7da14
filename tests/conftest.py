import os

# Triton reads TRITON_INTERPRET when it is imported: set it before anything imports triton, so
# kernel tests can run Triton kernels on the CPU. Model-level tests default to the torch path
# (FLEXLORA_BACKEND), because the interpreter is far too slow for them; kernel tests pass
# backend="triton" explicitly.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FLEXLORA_BACKEND", "torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
