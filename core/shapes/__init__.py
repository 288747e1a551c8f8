"""The synthetic shapes world, whose truth is known, and its exact annotator."""
