"""The TopK sparse autoencoder: model, save and load, the bank of SAEs, sparse kernels."""
