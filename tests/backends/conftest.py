import os

# The Triton kernels run on CPU in the interpreter unless a run asks otherwise
# (TRITON_INTERPRET=0 on a CUDA machine runs the same parity tests on the GPU).
# Must be set before kvq.backends.triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
