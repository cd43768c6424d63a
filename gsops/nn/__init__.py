"""Layer modules: the adapter layers (see :mod:`gsops.nn.adapters` for where each piece lives) and GS-SOC layers."""
