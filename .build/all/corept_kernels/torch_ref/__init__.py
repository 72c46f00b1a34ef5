"""Pure-torch reference twins of every kernel: same signatures, same semantics, autograd backward.

They are the fallback when a Triton kernel cannot run (CPU without the interpreter, no backward,
compile regions) and the references the kernel tests compare against.
"""
