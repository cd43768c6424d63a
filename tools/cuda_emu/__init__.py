"""The CPU CUDA emulator: run.py builds and runs csrc/ under it, loader.py makes its build of the binding gsops._C."""
