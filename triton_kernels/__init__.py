"""Triton kernels (one op per file: kernel + launcher). Imported only by gsops.backends.triton_backend."""
