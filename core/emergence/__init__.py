"""The emergence paper: words, concept dictionaries, composition, steering, evaluations."""
