"""Find, record and steer concepts in text-to-image diffusion models with sparse autoencoders."""
