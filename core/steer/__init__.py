"""Steering: edit a block's residual updates with SAE concept vectors during stage windows."""
