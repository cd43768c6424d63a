"""Layer modules: adapters (GSOFT, OFT, BOFT, ...) and GS-SOC layers."""
