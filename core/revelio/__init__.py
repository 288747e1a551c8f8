"""The Revelio paper: pooled features, feature cache, k-SAEs, label purity, Diff-C, PCA maps."""
