"""Model families built from gsops layers (LipConvnet)."""
